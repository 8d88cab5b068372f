"""Tracing one suspect: the use cases ``securemark trace``, the ``trace`` and ``blackbox``
stages and the deployments share.

- :func:`trace_model`: a model file or registry URI, read white-box (hostile input:
  tensors only), re-aligned to the base model and decided at ``trace.epsilon``;
- :func:`trace_endpoint`: a prediction API, queried with the secret key images until the
  evidence clears the bound or the budget is spent (an under-powered read is
  inconclusive, :func:`securemark.tracing.blackbox.patterns_needed`);
- :func:`log_trace`: every trace as an MLflow run (experiment ``securemark-trace``: report
  JSON and markdown, score plot), published to the Prefect UI inside a flow run; with
  ``log="queue"`` (the ``securemark trace`` command) the run is queued and written by a
  background process (:mod:`flows.adapters.trace_log`), so the verdict is not kept
  waiting for MLflow.

Each returns the report (a dict); the Prefect flows around them live in
:mod:`flows.trace`. MLflow and Prefect are imported only where a run is written or a
registry URI is read, so a command that needs neither stays fast.
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

from flows.adapters import artifacts, reports, trace_log
from flows.adapters.endpoint import PredictionAPI
from flows.adapters.logs import run_logger
from flows.adapters.paths import Paths
from flows.adapters.settings import Settings
from flows.adapters.vendor import open_vendor
from securemark.suspect import examine, expected_shapes
from securemark.tracing import codebook_indices
from securemark.vendor import TraceConfig, Vendor


def _local_file(paths: Paths, model: str, workdir: Path) -> Path:
    """``model`` as a local file: a path as it is, a ``models:/`` / ``runs:/`` URI fetched
    from the MLflow registry into ``workdir``."""
    if not model.startswith(("models:/", "runs:/")):
        return Path(model)
    from flows.adapters import tracking
    from flows.adapters.model_registry import resolve_model

    tracking.configure(paths)
    return resolve_model(model, workdir)


def trace_model(paths: Paths, settings: Settings, model: str, trace: TraceConfig | None = None, vendor: Vendor | None = None,
                log: str = "now") -> dict:
    """Trace one suspicious model; returns the report (raises InvalidModel on bad input).

    The file (or the registry's copy) is read once: the tensors examined and the sha256
    reported come from the same bytes. ``trace``: trace settings to use instead of
    ``settings.trace`` (the CLI's flags); ``vendor``: an opened vendor to reuse (a stage
    tracing many models); ``log``: ``now`` or ``queue`` (:func:`log_trace`). Runs inside or
    outside a Prefect flow run."""
    cfg = trace or settings.trace
    vendor = vendor or open_vendor(paths, settings)
    with tempfile.TemporaryDirectory(prefix="securemark-trace-") as tmp:
        state, sha = examine(_local_file(paths, model, Path(tmp)), expected_shapes(settings.model))
    result = vendor.trace_weights(state, cfg)
    report = reports.verdict_report(result.verdict, vendor.customers_by_index(), vendor.key, vendor.codebook, model, sha, result.alignment)
    report["off_data_ratio"] = result.off_data_ratio  # docs/tracing.md "Known break": an update of the base above trace.off_data_limit was obfuscated
    report["obfuscated"] = result.obfuscated
    # no one accused means nothing when the model was obfuscated, or when nothing could be read from it (degenerate)
    report["inconclusive"] = result.inconclusive
    report["inconclusive_reason"] = result.inconclusive_reason
    return log_trace(paths, report, result.verdict, codebook_indices(vendor.codebook), cfg, vendor,
                     tags={"model": model[:250], "model_sha256": sha, "channel": "weights"}, log=log)


def trace_endpoint(paths: Paths, settings: Settings, url: str, budget: int | None = None, protocol: str = "auto",
                   trace: TraceConfig | None = None, vendor: Vendor | None = None, log: str = "now") -> dict:
    """Trace a prediction API by the black-box fingerprint: query the vendor's secret key
    images, stop as soon as the evidence clears the bound (or the budget is spent), and
    report like a file trace (MLflow run, markdown, JSON), with the queries spent."""
    cfg = trace or settings.trace
    bb = settings.blackbox
    vendor = vendor or open_vendor(paths, settings)  # query_limit refuses a budget below 1 before any query
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
                     tags={"endpoint": url[:250], "channel": "api"}, log=log)


def log_trace(paths: Paths, report: dict, verdict, indices, cfg: TraceConfig, vendor: Vendor, tags: dict[str, str], log: str = "now") -> dict:
    """One trace as an MLflow run (report JSON and markdown, score plot), published to the
    Prefect UI when it runs inside a flow; returns the report with the run's id and link.

    ``log="queue"``: the record is put in the outbox first and a background process writes
    the run (:mod:`flows.adapters.trace_log`); the report then says where the record waits
    (``mlflow_queued``) instead of the run's id."""
    if log not in ("now", "queue"):
        raise ValueError(f"log must be 'now' or 'queue', got {log!r}")
    report["trace_id"] = uuid.uuid4().hex  # names the MLflow run (tag trace_id), whenever it is written
    entry = trace_log.record(report, verdict, indices, cfg, vendor.key.key_id, {**tags, "trace_id": report["trace_id"]})
    if log == "queue":
        report["mlflow_queued"] = str(trace_log.queue(paths, entry))
        trace_log.spawn_drain(paths)
        return report
    report["mlflow_run_id"], report["mlflow_run_url"] = trace_log.log_record(paths, entry)
    publish(report)
    run_logger(__name__).info("accused: %s", [a["customer_id"] for a in report["accused"]] or "no one")
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
