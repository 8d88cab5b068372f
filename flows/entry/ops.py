"""The operator's flows: what ``make serve`` deploys to the Prefect server.

Each takes only simple parameters (what the Prefect UI's "Run" form can fill in) and
finds the project from the environment (``SECUREMARK_ROOT``, else the working
directory), then runs the same flows as ``dvc repro`` and the CLI:

- ``issue-fingerprint(customers)``: fingerprinted copies (fan-out per customer);
- ``trace-suspicious-model(model | endpoint)``: a path or ``models:/NAME@ALIAS`` URI, or
  the URL of a prediction API (black-box);
- ``robustness-audit()``: the params' attack grid against the registry's current
  customer copies, compared with the previous audit (scheduled by ``ops.audit_cron``);
- ``retrain(variant)``: split training, which registers a new base model version.
"""

from __future__ import annotations

from datetime import datetime, timezone

import mlflow
from mlflow import MlflowClient
from prefect import flow, get_run_logger

from flows.adapters import artifacts, reports, tracking
from flows.adapters.paths import Paths
from flows.adapters.settings import Settings
from flows.attack import run_attacks
from flows.issue import run_issue
from flows.trace import trace_endpoint_flow, trace_flow
from flows.train import train_flow
from securemark.evaluation.grid import compare_audits
from securemark.errors import InvalidConfig

AUDIT_EXPERIMENT = "securemark-audit"


def project(profile: str | None = None) -> tuple[Paths, Settings]:
    """The project these deployments serve (``SECUREMARK_ROOT`` or the working
    directory) and its settings, built once per run (``profile``: that profile's, else
    the one params.yaml selects)."""
    paths = Paths.from_env()
    return paths, Settings.load(paths.params, profile)


@flow(name="issue-fingerprint")
def issue_fingerprint(customers: list[str]) -> list[dict]:
    """Issue (or re-issue, idempotently) fingerprinted copies to ``customers``."""
    paths, settings = project()
    return run_issue(paths, settings, customers)


@flow(name="trace-suspicious-model")
def trace_suspicious_model(model: str | None = None, epsilon: float | None = None, endpoint: str | None = None,
                           budget: int | None = None) -> dict:
    """Trace a model file or registry URI (``model``, white-box) or a prediction API
    (``endpoint``, black-box, at most ``budget`` queries); the verdict is published as
    artifacts."""
    paths, settings = project()
    if (model is None) == (endpoint is None):
        raise InvalidConfig("trace-suspicious-model: give exactly one of `model` (a file or models:/ URI) and `endpoint` (a URL)")
    trace = settings.trace.with_overrides(epsilon=epsilon)
    if endpoint is not None:
        return trace_endpoint_flow(paths, settings, endpoint, budget, "auto", trace)
    return trace_flow(paths, settings, model, trace)


def previous_audit(client: MlflowClient | None = None) -> dict | None:
    """The summary of the latest finished audit, or None on the first audit."""
    experiment = mlflow.get_experiment_by_name(AUDIT_EXPERIMENT)
    if experiment is None:
        return None
    runs = (client or MlflowClient()).search_runs([experiment.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                                  order_by=["attributes.start_time DESC"], max_results=1)
    return mlflow.artifacts.load_dict(f"runs:/{runs[0].info.run_id}/audit.json") if runs else None


@flow(name="robustness-audit")
def robustness_audit(profile: str = "full") -> dict:
    """Re-run the attack grid of ``profile`` (the whole grid by default: README
    "Profiles") against the registry's customer copies and compare with the last audit;
    logs the audit to MLflow (experiment ``securemark-audit``)."""
    logger = get_run_logger()
    paths, settings = project(profile)
    tracking.configure(paths)
    previous = previous_audit()
    result = run_attacks(paths, settings, source="registry")
    summary = {**result["summary"], "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    comparison = compare_audits(previous["tradeoff"] if previous else None, summary["tradeoff"])
    with tracking.run("robustness-audit", AUDIT_EXPERIMENT, paths) as run:
        mlflow.log_metrics({"attacked_models": summary["attacked_models"], "innocents_accused": summary["innocents_accused_total"],
                            "regressions": sum(r["status"] == "regressed" for r in comparison)})
        mlflow.log_dict(summary, "audit.json")
        mlflow.log_dict({"comparison": comparison}, "comparison.json")
        mlflow.log_table(result["rows"], "attack_rows.json")
        url = artifacts.mlflow_run_url(run.info.run_id, run.info.experiment_id)
    artifacts.publish_markdown(artifacts.AUDIT, reports.audit_markdown(summary, comparison, previous) + f"\n[MLflow run]({url})\n",
                               "Robustness audit vs the previous one")
    artifacts.publish_table(artifacts.AUDIT_RESULTS, comparison, "Per attack family and coalition size: traced fraction now and at the previous audit")
    logger.info("audit: %d attacked models, %d regressions", summary["attacked_models"], sum(r["status"] == "regressed" for r in comparison))
    return {"summary": summary, "comparison": comparison}


@flow(name="retrain")
def retrain(variant: str = "defended") -> dict:
    """Split training of the base model (``defended`` or ``undefended``); registers a new version."""
    paths, settings = project()
    return train_flow(paths, settings, variant)
