"""Tracing one suspect: the use cases ``securemark trace``, the ``trace`` and ``blackbox``
stages and the deployments share.

- :func:`trace_model`: a model file or registry URI, read white-box (hostile input:
  tensors only), re-aligned to the base model and decided at ``trace.epsilon``;
- :func:`trace_endpoint`: a prediction API, queried with the secret key images until the
  evidence clears the bound or the budget is spent (an under-powered read is
  inconclusive, :func:`securemark.tracing.blackbox.patterns_needed`);
- :func:`log_trace`: every trace as an MLflow run (experiment ``securemark-trace``: report
  JSON and markdown, score plot), published to the Prefect UI inside a flow run.

Each returns the report (a dict); the Prefect flows around them live in
:mod:`flows.trace`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow

from flows.adapters import artifacts, reports, tracking
from flows.adapters.endpoint import PredictionAPI
from flows.adapters.logs import run_logger
from flows.adapters.model_registry import resolve_model
from flows.adapters.paths import Paths
from flows.adapters.settings import Settings
from flows.adapters.tracking import TRACE_EXPERIMENT
from flows.adapters.vendor import open_vendor
from securemark.errors import InvalidInput
from securemark.suspect import examine, expected_shapes
from securemark.tracing import codebook_indices
from securemark.vendor import TraceConfig, Vendor


def trace_model(paths: Paths, settings: Settings, model: str, trace: TraceConfig | None = None, vendor: Vendor | None = None) -> dict:
    """Trace one suspicious model; returns the report (raises InvalidModel on bad input).

    The file (or the registry's copy) is read once: the tensors examined and the sha256
    reported come from the same bytes. ``trace``: trace settings to use instead of
    ``settings.trace`` (the CLI's flags); ``vendor``: an opened vendor to reuse (a stage
    tracing many models). Runs inside or outside a Prefect flow run."""
    cfg = trace or settings.trace
    tracking.configure(paths)
    vendor = vendor or open_vendor(paths, settings)
    with tempfile.TemporaryDirectory(prefix="securemark-trace-") as tmp:
        state, sha = examine(resolve_model(model, Path(tmp)), expected_shapes(settings.model))
    result = vendor.trace_weights(state, cfg)
    report = reports.verdict_report(result.verdict, vendor.customers_by_index(), vendor.key, vendor.codebook, model, sha, result.alignment)
    report["off_data_ratio"] = result.off_data_ratio  # docs/tracing.md "Known break": an update of the base above trace.off_data_limit was obfuscated
    report["obfuscated"] = result.obfuscated
    # no one accused means nothing when the model was obfuscated, or when nothing could be read from it (degenerate)
    report["inconclusive"] = result.inconclusive
    report["inconclusive_reason"] = result.inconclusive_reason
    return log_trace(paths, report, result.verdict, codebook_indices(vendor.codebook), cfg, vendor,
                     tags={"model": model[:250], "model_sha256": sha, "channel": "weights"})


def trace_endpoint(paths: Paths, settings: Settings, url: str, budget: int | None = None, protocol: str = "auto",
                   trace: TraceConfig | None = None, vendor: Vendor | None = None) -> dict:
    """Trace a prediction API by the black-box fingerprint: query the vendor's secret key
    images, stop as soon as the evidence clears the bound (or the budget is spent), and
    report like a file trace (MLflow run, markdown, JSON), with the queries spent."""
    cfg = trace or settings.trace
    bb = settings.blackbox
    if budget is not None and budget < 1:
        raise InvalidInput(f"--budget must be at least 1 query, got {budget}")
    tracking.configure(paths)
    vendor = vendor or open_vendor(paths, settings)
    api = PredictionAPI(url, protocol, bb.batch, bb.timeout, bb.retries, bb.max_response_bytes, budget=vendor.query_limit(budget))
    read = vendor.trace_api(api.predict, budget, cfg)
    result = read.result
    report = reports.verdict_report(result.verdict, vendor.customers_by_index(), vendor.key, vendor.blackbox_codebook, url, "",
                                    {}, channel="api", queries=api.queries)
    report["patterns_answered"] = result.answered
    report["patterns_needed"] = result.needed  # an unmodified copy read on fewer patterns could not be accused
    report["inconclusive"] = result.inconclusive
    report["inconclusive_reason"] = read.inconclusive_reason
    return log_trace(paths, report, result.verdict, codebook_indices(vendor.blackbox_codebook), cfg, vendor,
                     tags={"endpoint": url[:250], "channel": "api"})


def log_trace(paths: Paths, report: dict, verdict, indices, cfg: TraceConfig, vendor: Vendor, tags: dict[str, str]) -> dict:
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
