"""Tracing one suspect: the use cases ``securemark trace``, the ``trace`` and ``blackbox``
stages and the deployments share.

- :func:`trace_model`: a model file or registry URI, read white-box (hostile input:
  tensors only), re-aligned to the base model and decided at ``trace.epsilon``;
- :func:`trace_endpoint`: a prediction API, queried with the secret key images until the
  evidence clears the bound or the budget is spent (an under-powered read is
  inconclusive, :func:`securemark.blackbox.patterns_needed`);
- :func:`log_trace`: every trace as an MLflow run (experiment ``securemark-trace``: report
  JSON and markdown, score plot), published to the Prefect UI inside a flow run.

Each returns the report (a dict); the Prefect flows around them live in
:mod:`flows.trace`.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import mlflow

from flows.adapters import artifacts, reports, tracking
from flows.adapters.endpoint import PredictionAPI
from flows.adapters.logs import run_logger
from flows.adapters.model_registry import resolve_model
from flows.adapters.paths import Paths
from flows.adapters.settings import Settings, TraceSettings
from flows.adapters.tracking import TRACE_EXPERIMENT
from flows.adapters.vendor import Vendor, make_extractor, make_keyset
from securemark.blackbox import sequential_trace
from securemark.errors import InvalidInput
from securemark.key import derive_seed
from securemark.suspect import examine, expected_shapes
from securemark.tracing import OFF_DATA_NOTE, codebook_indices, decide_readings, degeneracy, no_verdict, suspect_outputs_finite


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
