"""Reports in the Prefect UI: artifacts with stable keys, so the UI keeps their history.

Keys (lowercase, dashes): ``issued-copies`` (table), ``trace-verdict`` (markdown),
``trace-scores`` (table), ``trace-mlflow-run`` (link), ``attack-results`` (table),
``robustness-audit`` (markdown) and ``robustness-audit-results`` (table). Outside a
Prefect run (a plain function call) the artifact functions are no-ops, and a process
that never imported Prefect cannot be inside a run: there they return without importing
it (``securemark trace`` outside a flow stays fast).
"""

from __future__ import annotations

import os
import sys

ISSUED = "issued-copies"
TRACE_VERDICT = "trace-verdict"
TRACE_SCORES = "trace-scores"
TRACE_RUN = "trace-mlflow-run"
ATTACK_RESULTS = "attack-results"
AUDIT = "robustness-audit"
AUDIT_RESULTS = "robustness-audit-results"

MLFLOW_UI_ENV = "SECUREMARK_MLFLOW_UI"  # where operators open MLflow (default: `make mlflow-ui`)


def _in_run() -> bool:
    if "prefect" not in sys.modules:  # no flow or task can be running in this process
        return False
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def mlflow_run_url(run_id: str, experiment_id: str) -> str:
    """A browser link to an MLflow run: the tracking server itself when MLflow is served
    over HTTP, otherwise ``SECUREMARK_MLFLOW_UI`` (default ``http://127.0.0.1:5000``,
    where ``make mlflow-ui`` serves the project's store)."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    base = uri if uri.startswith(("http://", "https://")) else os.environ.get(MLFLOW_UI_ENV, "http://127.0.0.1:5000")
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def publish_table(key: str, rows: list[dict], description: str) -> None:
    if _in_run():
        from prefect.artifacts import create_table_artifact

        create_table_artifact(key=key, table=rows, description=description)


def publish_markdown(key: str, text: str, description: str) -> None:
    if _in_run():
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(key=key, markdown=text, description=description)


def publish_link(key: str, url: str, text: str, description: str) -> None:
    if _in_run():
        from prefect.artifacts import create_link_artifact

        create_link_artifact(key=key, link=url, link_text=text, description=description)
