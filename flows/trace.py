"""Tracing a suspicious model: ``securemark trace`` and the ``trace`` stage.

``trace_flow`` takes a path (safetensors or tensor-only state dict) or a registry URI
(``models:/NAME@ALIAS``), loads it as hostile input (tensors only, checked against the
base architecture), re-aligns it to the base model (undoing channel permutations and
positive rescalings, :mod:`securemark.alignment`), extracts ``y = K w``, scores every
code word of the codebook and decides at the whole-trace false-accusation probability
``epsilon``. Each trace is an MLflow run (experiment ``securemark-trace``) with the
report (JSON + markdown) and a score plot.

The ``trace`` stage (``python -m flows.trace``) traces every issued copy unmodified
(each must accuse exactly its customer) and a set of null models (none may accuse
anyone), and writes ``metrics/trace.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import mlflow
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from tqdm.auto import tqdm

from flows.adapters import artifacts, reports, tracking
from flows.adapters.logs import run_logger
from flows.adapters.model_registry import resolve_model
from flows.adapters.paths import Paths
from flows.adapters.settings import Settings, TraceSettings
from flows.adapters.endpoint import PredictionAPI
from flows.adapters.vendor import Vendor, make_extractor, make_keyset
from flows.entry.stage import stage_main
from securemark.blackbox import sequential_trace
from securemark.errors import InvalidInput
from securemark.key import derive_seed, draw_key, null_secret
from securemark.model import SplitNet
from securemark.suspect import examine, expected_shapes
from securemark.tracing import OFF_DATA_NOTE, codebook_indices, decide_readings, degeneracy, no_verdict, suspect_outputs_finite
from securemark.weights import load_weights

TRACE_EXPERIMENT = "securemark-trace"


@flow(name="trace-model", validate_parameters=False)
def trace_flow(paths: Paths, settings: Settings, model: str, trace: TraceSettings | None = None) -> dict:
    """Trace one suspicious model as a Prefect flow (artifacts in the UI); see :func:`trace_model`."""
    return trace_model(paths, settings, model, trace)


def trace_model(paths: Paths, settings: Settings, model: str, trace: TraceSettings | None = None) -> dict:
    """Trace one suspicious model; returns the report (raises InvalidModel on bad input).

    The file (or the registry's copy) is read once: the tensors examined and the sha256
    reported come from the same bytes. ``trace``: trace settings to use instead of
    ``settings.trace`` (the CLI's flags). Runs inside or outside a Prefect flow run."""
    cfg = trace or settings.trace
    tracking.configure(paths)
    vendor = Vendor.open(paths, settings)
    with tempfile.TemporaryDirectory(prefix="securemark-trace-") as tmp:
        state, sha = examine(resolve_model(model, Path(tmp)), expected_shapes(settings.model))
    indices = codebook_indices(vendor.codebook)
    extractor = make_extractor(paths, settings, vendor)
    suspect = extractor.model(state)
    note = note_degenerate = degeneracy(suspect, extractor.probe, vendor.key.layer)
    off_data, obfuscated = float("nan"), False
    if not suspect_outputs_finite(suspect, extractor.probe):
        verdict, alignment = no_verdict(cfg, indices, note), {}
    else:
        aligned, alignment = extractor.aligned(suspect)
        verdict = decide_readings(extractor.readings(aligned), vendor.codebook, indices, cfg.epsilon, cfg.scorer, cfg.decoder)
        off_data, obfuscated = extractor.off_data_ratio(aligned), extractor.obfuscated(aligned)
        if obfuscated:
            note = " ".join(filter(None, (note, OFF_DATA_NOTE.format(layer=vendor.key.layer, ratio=off_data, limit=cfg.off_data_limit,
                                                                moved=extractor.readout_change(aligned)))))
        if note:
            verdict = dataclasses.replace(verdict, note=" ".join(filter(None, (note, verdict.note))))
    report = reports.verdict_report(verdict, vendor.customers_by_index(), vendor.key, vendor.codebook, model, sha, alignment)
    report["off_data_ratio"] = off_data  # README "Known break": an update of the base above trace.off_data_limit was obfuscated
    report["obfuscated"] = obfuscated
    # no one accused means nothing when the model was obfuscated, or when nothing could be read from it (degenerate)
    reason = "obfuscated" if obfuscated else "degenerate" if note_degenerate else ""
    report["inconclusive"] = bool(not verdict.accused and reason)
    report["inconclusive_reason"] = reason if report["inconclusive"] else ""
    return log_trace(paths, report, verdict, indices, cfg, vendor, tags={"model": model[:250], "model_sha256": sha, "channel": "weights"})


@flow(name="trace-endpoint", validate_parameters=False)
def trace_endpoint_flow(paths: Paths, settings: Settings, url: str, budget: int | None = None, protocol: str = "auto",
                        trace: TraceSettings | None = None) -> dict:
    """Trace a prediction API as a Prefect flow (artifacts in the UI); see :func:`trace_endpoint`."""
    return trace_endpoint(paths, settings, url, budget, protocol, trace)


def trace_endpoint(paths: Paths, settings: Settings, url: str, budget: int | None = None, protocol: str = "auto",
                   trace: TraceSettings | None = None) -> dict:
    """Trace a prediction API by the black-box fingerprint: query the vendor's secret key
    images, stop as soon as the evidence clears the bound (or the budget is spent), and
    report like a file trace (MLflow run, markdown, JSON), with the queries spent."""
    cfg = trace or settings.trace
    bb = settings.blackbox
    if budget is not None and budget < 1:
        raise InvalidInput(f"--budget must be at least 1 query, got {budget}")
    tracking.configure(paths)
    vendor = Vendor.open(paths, settings)
    keys = make_keyset(paths, settings, vendor)
    limit = bb.max_queries if budget is None else min(budget, bb.max_queries)
    api = PredictionAPI(url, protocol, bb.batch, bb.timeout, bb.retries, bb.max_response_bytes, budget=limit)
    checkpoints = tuple(c for c in bb.checkpoints if c <= limit) or (limit,)
    repeats = max(1, min(bb.repeats, limit // len(keys))) if limit >= len(keys) else 1
    indices = codebook_indices(vendor.blackbox_codebook)
    result = sequential_trace(api.predict, keys, vendor.blackbox_codebook, indices, cfg.epsilon, checkpoints, repeats,
                              order_seed=derive_seed(vendor.secret, "key-order"), explain=bb.explain)
    report = reports.verdict_report(result.verdict, vendor.customers_by_index(), vendor.key, vendor.blackbox_codebook, url, "",
                                    {}, channel="api", queries=api.queries)
    report["patterns_answered"] = result.answered
    report["patterns_needed"] = result.needed  # an unmodified copy read on fewer patterns could not be accused
    report["inconclusive"] = result.inconclusive
    report["inconclusive_reason"] = "under-powered" if result.inconclusive else ""
    return log_trace(paths, report, result.verdict, indices, cfg, vendor, tags={"endpoint": url[:250], "channel": "api"})


def log_trace(paths: Paths, report: dict, verdict, indices, cfg: TraceSettings, vendor: Vendor, tags: dict[str, str]) -> dict:
    """One trace as an MLflow run (report JSON and markdown, score plot), published to the
    Prefect UI when it runs inside a flow; returns the report with the run's id and link."""
    logger = run_logger(__name__)
    with tracking.run("trace", TRACE_EXPERIMENT, paths, tags=tags) as run:
        mlflow.log_params({"model": report["model"][:250], "epsilon": cfg.epsilon, "scorer": cfg.scorer, "key_id": vendor.key.key_id,
                           "channel": report.get("channel", "weights")})
        mlflow.log_metrics({"accused": len(report["accused"]), "threshold": min(verdict.threshold, 1e300),
                            "max_score": float(verdict.scores.max()), "queries": float(report.get("queries") or 0)})
        mlflow.log_dict(report, "trace_report.json")
        mlflow.log_text(reports.trace_markdown(report), "trace_report.md")
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.log_artifact(str(reports.score_plot(verdict, indices, Path(tmp) / "scores.png")))
        report["mlflow_run_id"] = run.info.run_id
        report["mlflow_run_url"] = artifacts.mlflow_run_url(run.info.run_id, run.info.experiment_id)
    publish(report)
    logger.info("accused: %s", [a["customer_id"] for a in report["accused"]] or "no one")
    return report


def publish(report: dict) -> None:
    """The verdict in the Prefect UI: markdown (verdict, scores, threshold, model hash),
    a table of the accused and the highest other scores, and a link to the MLflow run."""
    artifacts.publish_markdown(artifacts.TRACE_VERDICT, reports.trace_markdown(report) + f"\n[MLflow run]({report['mlflow_run_url']})\n",
                               f"Verdict of tracing {report['model'][:120]}")
    rows = [{"role": "accused", **a} for a in report["accused"]] + [{"role": "not accused", **a} for a in report["top_innocent_scores"]]
    artifacts.publish_table(artifacts.TRACE_SCORES, [{**r, "threshold": report["threshold"]} for r in rows],
                            "Accused customers and the highest scores below the threshold")
    artifacts.publish_link(artifacts.TRACE_RUN, report["mlflow_run_url"], f"MLflow run {report['mlflow_run_id']}",
                           "The trace's MLflow run (reports, score plot)")


# ----------------------------------------------------------------------------- stage
@task(name="null-models", cache_policy=NO_CACHE)
def null_model_scores(paths: Paths, settings: Settings, copies: list[Path]) -> list[dict]:
    """Verdicts for models that carry none of the codebook's words.

    - the base model, and the models the attacker trained alone (``attacker_baseline``:
      the vendor's architecture and recipe, other initial weights, other data): trained
      independently, each examined under the vendor's key and ``trace.null_random_keys``
      other keys (``null_scores_independent`` counts the code words scored against them);
    - every issued copy examined under ``trace.null_random_keys`` other keys, derived
      from ``base.seed`` so the stage is reproducible (the copy's fingerprint is
      invisible under a key it was not embedded with).
    """
    cfg = settings.trace
    vendor = Vendor.open(paths, settings)
    indices = codebook_indices(vendor.codebook)
    layer, m = vendor.key.layer, vendor.codebook.length
    extractor = make_extractor(paths, settings, vendor)
    nulls: list[tuple[str, SplitNet, bytes | None]] = []  # (name, aligned model, the secret of another key; None: the vendor's)
    nulls.append(("base", extractor.aligned(load_weights(paths.base_model))[0], None))
    for budget in settings.attacker.budgets:  # trained independently, never fingerprinted: under the vendor's key and others
        aligned = extractor.aligned(load_weights(paths.attacker_alone_model(budget)))[0]
        nulls.append((f"attacker-alone-{budget}", aligned, None))
        for j in range(cfg.null_random_keys):
            nulls.append((f"attacker-alone-{budget}@random-key-{j}", aligned, null_secret(settings.base.seed, f"attacker-alone-{budget}", j)))
    for copy in copies:
        aligned = extractor.aligned(load_weights(copy))[0]
        for j in range(cfg.null_random_keys):
            nulls.append((f"{copy.parent.name}@random-key-{j}", aligned, null_secret(settings.base.seed, copy.parent.name, j)))
    rows = []
    for name, aligned, other in tqdm(nulls, desc="null models", unit="model"):
        # another key is drawn when it is used (a 1024-bit key over the readout is ~130 MB: never hold them all)
        K = vendor.key_matrix if other is None else draw_key(other, layer, m, vendor.key.n_weights)
        verdict = decide_readings(extractor.readings(aligned, K), vendor.codebook, indices, cfg.epsilon, cfg.scorer, cfg.decoder)
        rows.append({"model": name, "independent": not name.startswith(("base", "customer-")), "accused": len(verdict.accused),
                     "scores": len(indices) * max(1, len(verdict.readings)), "max_score": float(verdict.scores.max()),
                     "threshold": verdict.threshold, "off_data_ratio": extractor.off_data_ratio(aligned),
                     "obfuscated": extractor.obfuscated(aligned)})
    return rows


@flow(name="trace-issued-copies", validate_parameters=False)
def trace_stage_flow(paths: Paths, settings: Settings) -> dict:
    logger = get_run_logger()
    tracking.configure(paths)
    issued = Vendor.open(paths, settings).issued_codewords()
    copies = paths.issued_copies()
    correct, rows, start = 0, [], time.perf_counter()
    for copy in tqdm(copies, desc="tracing copies", unit="copy"):
        report = trace_flow(paths, settings, str(copy))
        accused = [a["customer_id"] for a in report["accused"]]
        ok = accused == [copy.parent.name] and copy.parent.name in issued
        correct += ok
        rows.append({"customer_id": copy.parent.name, "accused": accused, "correct": ok, "off_data_ratio": report["off_data_ratio"],
                     "obfuscated": report["obfuscated"]})
    nulls = null_model_scores(paths, settings, copies)
    unkeyed = [n for n in nulls if "@" not in n["model"]]  # each model once: the base and the independently trained ones
    metrics = {
        "copies_traced": len(copies),
        "copies_correct": correct,
        "null_models": len(nulls),
        "null_accusations": sum(n["accused"] for n in nulls),
        "null_scores": sum(n["scores"] for n in nulls),  # code words scored against null models (every reading counted)
        "null_scores_independent": sum(n["scores"] for n in nulls if n["independent"]),  # ... against independently trained models
        "null_accusations_independent": sum(n["accused"] for n in nulls if n["independent"]),
        "max_null_score_ratio": max(n["max_score"] / n["threshold"] for n in nulls),
        # obfuscation check (tracing/tamper.py): nothing natural may be flagged
        "off_data_ratio_copies_max": max((r["off_data_ratio"] for r in rows), default=float("nan")),
        "off_data_ratio_null_max": max((n["off_data_ratio"] for n in unkeyed), default=float("nan")),
        "flagged_obfuscated": sum(r["obfuscated"] for r in rows + unkeyed),
        "seconds": round(time.perf_counter() - start, 1),
    }
    with tracking.run("trace-stage", TRACE_EXPERIMENT, paths, tags={"stage": "trace"}):
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        mlflow.log_dict({"copies": rows, "nulls": nulls}, "trace_stage.json")
    logger.info("trace stage: %s", metrics)
    return metrics


def _stage(paths: Paths, settings: Settings) -> None:
    tracking.write_json(trace_stage_flow(paths, settings), paths.trace_metrics)


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description="trace stage: trace issued copies and null models").parse_args(argv)
    stage_main(_stage)


if __name__ == "__main__":
    main()
