"""The ``trace`` stage and the Prefect flows around a single trace.

``trace_flow`` / ``trace_endpoint_flow`` run one trace (:mod:`flows.tracing`: a model
file or registry URI read white-box, or a prediction API queried with the secret keys)
as a Prefect flow, so the verdict is also published as artifacts in the UI.

The ``trace`` stage (``python -m flows.trace``) traces every issued copy unmodified
(each must accuse exactly its customer) and a set of null models (none may accuse
anyone), and writes ``metrics/trace.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import mlflow
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from tqdm.auto import tqdm

from flows.adapters import tracking
from flows.adapters.paths import Paths
from flows.adapters.settings import Settings
from flows.adapters.tracking import TRACE_EXPERIMENT
from flows.adapters.vendor import open_vendor
from flows.adapters.stage import stage_main
from flows.tracing import trace_endpoint, trace_model
from securemark.key import null_secret
from securemark.model import SplitNet
from securemark.vendor import TraceConfig, Vendor
from securemark.weights import load_weights


@flow(name="trace-model", validate_parameters=False)
def trace_flow(paths: Paths, settings: Settings, model: str, trace: TraceConfig | None = None, vendor: Vendor | None = None) -> dict:
    """Trace one suspicious model as a Prefect flow (artifacts in the UI); see :func:`trace_model`."""
    return trace_model(paths, settings, model, trace, vendor)


@flow(name="trace-endpoint", validate_parameters=False)
def trace_endpoint_flow(paths: Paths, settings: Settings, url: str, budget: int | None = None, protocol: str = "auto",
                        trace: TraceConfig | None = None) -> dict:
    """Trace a prediction API as a Prefect flow (artifacts in the UI); see :func:`trace_endpoint`."""
    return trace_endpoint(paths, settings, url, budget, protocol, trace)


# ----------------------------------------------------------------------------- stage
@task(name="null-models", cache_policy=NO_CACHE)
def null_model_scores(paths: Paths, settings: Settings, vendor: Vendor, copies: list[Path]) -> list[dict]:
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
    extractor = vendor.extractor()
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
        verdict = vendor.null_verdict(aligned, other)
        rows.append({"model": name, "independent": not name.startswith(("base", "customer-")), "accused": len(verdict.accused),
                     "scores": verdict.n_customers * max(1, len(verdict.readings)), "max_score": float(verdict.scores.max()),
                     "threshold": verdict.threshold, "off_data_ratio": extractor.off_data_ratio(aligned),
                     "obfuscated": extractor.obfuscated(aligned)})
    return rows


@flow(name="trace-issued-copies", validate_parameters=False)
def trace_stage_flow(paths: Paths, settings: Settings) -> dict:
    logger = get_run_logger()
    tracking.configure(paths)
    vendor = open_vendor(paths, settings)
    issued = vendor.issued_codewords()
    copies = paths.issued_copies()
    correct, rows, start = 0, [], time.perf_counter()
    for copy in tqdm(copies, desc="tracing copies", unit="copy"):
        report = trace_flow(paths, settings, str(copy), vendor=vendor)
        accused = [a["customer_id"] for a in report["accused"]]
        ok = accused == [copy.parent.name] and copy.parent.name in issued
        correct += ok
        rows.append({"customer_id": copy.parent.name, "accused": accused, "correct": ok, "off_data_ratio": report["off_data_ratio"],
                     "obfuscated": report["obfuscated"]})
    nulls = null_model_scores(paths, settings, vendor, copies)
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
