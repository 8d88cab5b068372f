"""Tracing a suspicious model: ``securemark trace`` and the ``trace`` stage.

``trace_flow`` takes a path (safetensors or tensor-only state dict) or a registry URI
(``models:/NAME@ALIAS``), loads it as hostile input (tensors only, checked against the
base architecture), re-aligns it to the base model (undoing channel permutations and
positive rescalings, :mod:`securemark.alignment`), extracts ``y = K w``, scores every customer in the ledger and
decides at the whole-trace false-accusation probability ``epsilon``. Each trace is an
MLflow run (experiment ``securemark-trace``) with the report (JSON + markdown) and a
score plot.

The ``trace`` stage (``python -m flows.trace``) traces every issued copy unmodified
(each must accuse exactly its customer) and a set of null models (none may accuse
anyone), and writes ``metrics/trace.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from flows import artifacts, tracking  # noqa: E402
from flows.entry import stage_main  # noqa: E402
from flows.project import Paths, section  # noqa: E402
from flows.registry import download_weights  # noqa: E402
from flows.vendor import Vendor  # noqa: E402
from securemark.alignment import align  # noqa: E402
from securemark.errors import ConfigError, InvalidModel  # noqa: E402
from securemark.fingerprint import extract  # noqa: E402
from securemark.key import projection  # noqa: E402
from securemark.model import ModelSpec, SplitNet, build_model  # noqa: E402
from securemark.storage import read_partition  # noqa: E402
from securemark.suspect import load_suspect  # noqa: E402
from securemark.training import train_epochs  # noqa: E402
from securemark.tracing import BOUND_DESCRIPTION, Verdict, create_decoder  # noqa: E402
from securemark.weights import load_weights, sha256_file  # noqa: E402

TRACE_EXPERIMENT = "securemark-trace"


@dataclass(frozen=True)
class TraceSettings:
    epsilon: float = 1e-6
    scorer: str = "correlation"
    decoder: str = "peeling"
    align: bool = True
    probe_size: int = 512


def settings(params: dict, epsilon: float | None = None, scorer: str | None = None) -> TraceSettings:
    section_ = params.get("trace", {})
    return TraceSettings(
        epsilon=float(epsilon if epsilon is not None else section_.get("epsilon", 1e-6)),
        scorer=scorer or section_.get("scorer", "correlation"),
        decoder=section_.get("decoder", "peeling"),
        align=bool(section_.get("align", True)),
        probe_size=int(section_.get("probe_size", 512)),
    )


@dataclass(frozen=True, eq=False)
class Extractor:
    """Soft values ``y = K w`` of a suspect, read after aligning it to the base model.

    ``reference`` is the vendor's base model and ``probe`` the first ``probe_size`` images
    of the vendor's ``aux`` partition; with ``align`` off (params ``trace.align``) the raw
    weights are projected, as before re-alignment existed.
    """

    spec: ModelSpec
    layer: str
    key_matrix: torch.Tensor
    reference: SplitNet
    probe: torch.Tensor
    align: bool = True

    def model(self, state_or_model) -> SplitNet:
        if isinstance(state_or_model, SplitNet):
            return state_or_model
        model = SplitNet(self.spec)
        model.load_state_dict(state_or_model)
        return model

    def aligned(self, state_or_model) -> tuple[SplitNet, dict]:
        """The suspect aligned to the base model, and the alignment summary (empty when off)."""
        if not self.align:
            return self.model(state_or_model), {}
        result = align(self.model(state_or_model), self.reference, self.probe)
        return result.model, result.summary()

    def __call__(self, state_or_model, key_matrix: torch.Tensor | None = None) -> tuple[np.ndarray, dict]:
        """``(y, alignment summary)`` under the vendor's key (or ``key_matrix``)."""
        model, summary = self.aligned(state_or_model)
        return extract(model, self.layer, self.key_matrix if key_matrix is None else key_matrix).numpy(), summary

    def raw(self, state_or_model) -> np.ndarray:
        """``y`` of the weights as they are (what an extractor without alignment reads)."""
        return extract(state_or_model, self.layer, self.key_matrix).numpy()


def make_extractor(paths: Paths, params: dict, vendor: Vendor, spec: ModelSpec) -> Extractor:
    cfg = settings(params)
    if cfg.probe_size < 1:
        raise ConfigError("trace.probe_size", f"must be a positive number of aux images, got {cfg.probe_size}")
    probe = read_partition(paths.partition("aux")).as_float()[: cfg.probe_size]
    return Extractor(spec, vendor.key.layer, vendor.key_matrix, load_weights(paths.models / "defended.safetensors"), probe, cfg.align)


def expected_shapes(spec: ModelSpec) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in SplitNet(spec).state_dict().items()}


def resolve_model(model: str, workdir: Path) -> Path:
    """A local file for ``model`` (a path, or a ``models:/`` / ``runs:/`` URI)."""
    if model.startswith(("models:/", "runs:/")):
        try:
            return download_weights(model, workdir)
        except Exception as exc:  # MLflow raises several types for unknown names/aliases
            raise InvalidModel(f"cannot fetch {model} from the MLflow registry: {str(exc).splitlines()[0]}") from None
    return Path(model)


def verdict_report(verdict: Verdict, vendor: Vendor, model: str, sha: str, alignment: dict | None = None) -> dict:
    by_index = {r.codeword_index: r.customer_id for r in vendor.ledger.records()}

    def row(c):
        return {"customer_id": by_index.get(c.codeword_index), "codeword_index": c.codeword_index, "score": c.score,
                "p_value": c.p_value, "family_p": c.family_p}

    return {
        "model": model,
        "model_sha256": sha,
        "key_id": vendor.key.key_id,
        "layer": vendor.key.layer,
        "code_family": vendor.codebook.family,
        "code_length": vendor.codebook.length,
        "scorer": verdict.scorer,
        "epsilon": verdict.epsilon,
        "threshold": verdict.threshold,
        "customers_scored": verdict.n_customers,
        "bound": BOUND_DESCRIPTION,
        "accused": [row(c) for c in verdict.accused],
        "top_innocent_scores": [row(c) for c in verdict.top_others],
        "alignment": alignment or {},
    }


def markdown(report: dict) -> str:
    lines = [f"# Trace of `{report['model']}`", "",
             f"- model sha256: `{report['model_sha256']}`",
             f"- key id: `{report['key_id']}` (layer `{report['layer']}`, {report['code_family']} code, {report['code_length']} bits)",
             f"- scorer: {report['scorer']}; customers scored: {report['customers_scored']}",
             f"- epsilon (whole trace): {report['epsilon']:g}; threshold: {report['threshold']:.3f}",
             f"- bound: {report['bound']}", ""]
    if report["accused"]:
        lines += ["## Accused", "", "| customer | code word | score | p-value bound | family-wise p |", "|---|---|---|---|---|"]
        lines += [f"| {a['customer_id']} | {a['codeword_index']} | {a['score']:.3f} | {a['p_value']:.3g} | {a['family_p']:.3g} |" for a in report["accused"]]
    else:
        lines += ["## Verdict: no one accused"]
    lines += ["", "## Highest scores below the threshold", "", "| customer | score |", "|---|---|"]
    lines += [f"| {a['customer_id']} | {a['score']:.3f} |" for a in report["top_innocent_scores"]]
    if report.get("alignment"):
        lines += ["", "## Re-alignment to the base model", "", "| block | channels moved | scale range | weakest match |", "|---|---|---|---|"]
        lines += [f"| {b} | {a['channels_moved']} | {a['scale_min']:.3g} to {a['scale_max']:.3g} | {a['min_similarity']:.3f} |"
                  for b, a in report["alignment"].items()]
    return "\n".join(lines) + "\n"


def score_plot(verdict: Verdict, indices: np.ndarray, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 3.5))
    accused = {c.codeword_index for c in verdict.accused}
    mask = np.isin(indices, list(accused))
    ax.scatter(indices[~mask], verdict.scores[~mask], s=6, color="tab:gray", label="customers")
    ax.scatter(indices[mask], verdict.scores[mask], s=30, color="tab:red", label="accused")
    ax.axhline(verdict.threshold, color="tab:red", linestyle="--", label=f"threshold (epsilon={verdict.epsilon:g})")
    ax.set_xlabel("code word index")
    ax.set_ylabel(f"{verdict.scorer} score")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def open_vendor(paths: Paths, params: dict) -> tuple[Vendor, ModelSpec]:
    from flows.project import build

    spec = build(ModelSpec, params, "model")
    layer = section(params, "fingerprint")["layer"]
    n_weights = SplitNet(spec).state_dict()[layer].numel()
    return Vendor.open(paths, params, n_weights), spec


def ledger_indices(vendor: Vendor) -> np.ndarray:
    """Code words scored in a trace: the whole codebook (``capacity`` words), not only
    those issued so far, so the union bound covers every customer the ledger can hold
    and a trace's threshold does not move as customers are added. Words not yet
    assigned are reported without a customer id."""
    return np.arange(len(vendor.codebook), dtype=np.int64)


@flow(name="trace-model")
def trace_flow(paths: Paths, params: dict, model: str, epsilon: float | None = None, scorer: str | None = None) -> dict:
    """Trace one suspicious model; returns the report (raises InvalidModel on bad input)."""
    logger = get_run_logger()
    cfg = settings(params, epsilon, scorer)
    tracking.configure(paths)
    vendor, spec = open_vendor(paths, params)
    with tempfile.TemporaryDirectory(prefix="securemark-trace-") as tmp:
        file = resolve_model(model, Path(tmp))
        state = load_suspect(file, expected_shapes(spec))
        sha = sha256_file(file)
    indices = ledger_indices(vendor)
    y, alignment = make_extractor(paths, params, vendor, spec)(state)
    verdict = create_decoder(cfg.decoder)(y, vendor.codebook, indices, cfg.epsilon, cfg.scorer)
    report = verdict_report(verdict, vendor, model, sha, alignment)
    with tracking.run("trace", TRACE_EXPERIMENT, paths, tags={"model": model[:250], "model_sha256": sha}) as run:
        mlflow.log_params({"model": model[:250], "epsilon": cfg.epsilon, "scorer": cfg.scorer, "key_id": vendor.key.key_id})
        mlflow.log_metrics({"accused": len(report["accused"]), "threshold": verdict.threshold,
                            "max_score": float(verdict.scores.max())})
        mlflow.log_dict(report, "trace_report.json")
        mlflow.log_text(markdown(report), "trace_report.md")
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.log_artifact(str(score_plot(verdict, indices, Path(tmp) / "scores.png")))
        report["mlflow_run_id"] = run.info.run_id
        report["mlflow_run_url"] = artifacts.mlflow_run_url(run.info.run_id, run.info.experiment_id)
    publish(report)
    logger.info("accused: %s", [a["customer_id"] for a in report["accused"]] or "no one")
    return report


def publish(report: dict) -> None:
    """The verdict in the Prefect UI: markdown (verdict, scores, threshold, model hash),
    a table of the accused and the highest other scores, and a link to the MLflow run."""
    artifacts.markdown(artifacts.TRACE_VERDICT, markdown(report) + f"\n[MLflow run]({report['mlflow_run_url']})\n",
                       f"Verdict of tracing {report['model'][:120]}")
    rows = [{"role": "accused", **a} for a in report["accused"]] + [{"role": "not accused", **a} for a in report["top_innocent_scores"]]
    artifacts.table(artifacts.TRACE_SCORES, [{**r, "threshold": report["threshold"]} for r in rows],
                    "Accused customers and the highest scores below the threshold")
    artifacts.link(artifacts.TRACE_RUN, report["mlflow_run_url"], f"MLflow run {report['mlflow_run_id']}", "The trace's MLflow run (reports, score plot)")


# ----------------------------------------------------------------------------- stage
@task(name="null-models", cache_policy=NO_CACHE)
def null_model_scores(paths: Paths, params: dict, vendor: Vendor, spec: ModelSpec, copies: list[Path]) -> list[dict]:
    """Verdicts for models that carry none of the ledger's code words.

    - the base model, and ``null_independent`` models trained from other initial
      weights for one epoch on the attacker partition;
    - every issued copy examined under ``random_keys`` other keys, derived from
      ``base.seed`` so the stage is reproducible (the copy's fingerprint is invisible
      under a key it was not embedded with).
    """
    cfg = params.get("trace", {})
    indices = ledger_indices(vendor)
    layer, m = vendor.key.layer, vendor.codebook.length
    eps = float(cfg.get("epsilon", 1e-6))
    extractor = make_extractor(paths, params, vendor, spec)
    nulls: list[tuple[str, SplitNet, torch.Tensor]] = []  # (name, aligned model, key)
    nulls.append(("base", extractor.aligned(load_weights(paths.models / "defended.safetensors"))[0], vendor.key_matrix))
    attacker = read_partition(paths.partition("attacker"))
    for i in range(int(cfg.get("null_independent", 3))):  # trained on other data, never fingerprinted
        model = train_epochs(build_model(spec, 10_000 + i), attacker.as_float(), attacker.labels, 1, torch.Generator().manual_seed(i))
        nulls.append((f"independent-{i}", extractor.aligned(model)[0], vendor.key_matrix))
    for copy in copies:
        state = extractor.aligned(load_weights(copy))[0]
        for j in range(int(cfg.get("null_random_keys", 10))):
            # other keys, reproducible from the params' seed (never the vendor's secret)
            other = hashlib.sha256(f"null-key|{params['base']['seed']}|{copy.parent.name}|{j}".encode()).digest()
            K = projection(other, layer, m, vendor.key.n_weights)
            nulls.append((f"{copy.parent.name}@random-key-{j}", state, K))
    rows = []
    for name, state, K in tqdm(nulls, desc="null models", unit="model"):
        y = extract(state, layer, K).numpy()
        verdict = create_decoder(cfg.get("decoder", "peeling"))(y, vendor.codebook, indices, eps, cfg.get("scorer", "correlation"))
        rows.append({"model": name, "accused": len(verdict.accused), "max_score": float(verdict.scores.max()), "threshold": verdict.threshold})
    return rows


@flow(name="trace-issued-copies")
def trace_stage_flow(paths: Paths, params: dict) -> dict:
    logger = get_run_logger()
    tracking.configure(paths)
    vendor, spec = open_vendor(paths, params)
    by_id = {r.customer_id: r for r in vendor.ledger.records("issued")}
    copies = sorted((paths.root / "data" / "customers").glob("*/model.safetensors"))
    correct, rows, start = 0, [], time.perf_counter()
    for copy in tqdm(copies, desc="tracing copies", unit="copy"):
        report = trace_flow(paths, params, str(copy))
        accused = [a["customer_id"] for a in report["accused"]]
        ok = accused == [copy.parent.name] and copy.parent.name in by_id
        correct += ok
        rows.append({"customer_id": copy.parent.name, "accused": accused, "correct": ok})
    nulls = null_model_scores(paths, params, vendor, spec, copies)
    metrics = {
        "copies_traced": len(copies),
        "copies_correct": correct,
        "null_models": len(nulls),
        "null_accusations": sum(n["accused"] for n in nulls),
        "max_null_score_ratio": max(n["max_score"] / n["threshold"] for n in nulls),
        "seconds": round(time.perf_counter() - start, 1),
    }
    with tracking.run("trace-stage", TRACE_EXPERIMENT, paths, tags={"stage": "trace"}):
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        mlflow.log_dict({"copies": rows, "nulls": nulls}, "trace_stage.json")
    logger.info("trace stage: %s", metrics)
    return metrics


def _stage(paths: Paths, params: dict) -> None:
    metrics = trace_stage_flow(paths, params)
    tracking.write_json(metrics, paths.metrics / "trace.json")


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description="trace stage: trace issued copies and null models").parse_args(argv)
    stage_main(_stage)


if __name__ == "__main__":
    main()
