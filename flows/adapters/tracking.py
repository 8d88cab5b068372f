"""MLflow wiring shared by every flow.

Default store: SQLite file ``mlflow.db`` in the project root, artifacts under
``mlruns/``; ``MLFLOW_TRACKING_URI`` overrides both (a server, another SQLite file).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import mlflow

from flows.adapters.paths import Paths
from securemark.private_files import private_dir, tighten

DATA_EXPERIMENT = "securemark-data"
TRAIN_EXPERIMENT = "securemark-train"
VENDOR_EXPERIMENT = "securemark-vendor-codewords"  # vendor-only: holds code words
TRACE_EXPERIMENT = "securemark-trace"  # one run per trace (report, score plot) and per tracing stage
PRIVATE_EXPERIMENTS = (VENDOR_EXPERIMENT,)  # artifact folders only their owner may enter


def configure(paths: Paths) -> str:
    """Point MLflow at the project's store and return the tracking URI."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{paths.mlflow_db}"
    mlflow.set_tracking_uri(uri)
    return uri


def experiment(name: str, paths: Paths) -> str:
    """Get or create an experiment whose artifacts live under the project's mlruns/.
    A vendor-only experiment's folder is made 0700 first, so nothing logged in it is
    ever readable by other local users."""
    local = not mlflow.get_tracking_uri().startswith(("http://", "https://", "databricks"))
    if local and name in PRIVATE_EXPERIMENTS:
        private_dir(paths.mlruns / name)
    existing = mlflow.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    location = (paths.mlruns / name).as_uri() if local else None
    return mlflow.create_experiment(name, artifact_location=location)


@contextmanager
def run(name: str, experiment_name: str, paths: Paths, tags: dict[str, str] | None = None) -> Iterator[mlflow.ActiveRun]:
    configure(paths)
    experiment_id = experiment(experiment_name, paths)
    tighten(paths.mlflow_db)  # the default store: owner-only (no-op for another store)
    with mlflow.start_run(run_name=name, experiment_id=experiment_id, tags=tags) as active:
        yield active


def child_run(parent: mlflow.ActiveRun, name: str, tags: dict[str, str], params: dict[str, Any], metrics: dict[str, float]) -> str:
    """A finished run nested under ``parent`` (same experiment), logged through the client
    so that it does not depend on which thread holds the active run; returns its id."""
    client = mlflow.MlflowClient()
    child = client.create_run(parent.info.experiment_id, run_name=name, tags={**tags, "mlflow.parentRunId": parent.info.run_id})
    run_id = child.info.run_id
    log_batch_to(client, run_id, params, metrics)
    client.set_terminated(run_id)
    return run_id


def log_batch(active: mlflow.ActiveRun, params: dict[str, Any], metrics: dict[str, float]) -> None:
    """Params and metrics of ``active`` in one store write (one transaction, not one per value)."""
    log_batch_to(mlflow.MlflowClient(), active.info.run_id, params, metrics)


def log_batch_to(client: mlflow.MlflowClient, run_id: str, params: dict[str, Any], metrics: dict[str, float]) -> None:
    """Params and metrics of the run ``run_id`` in one store write."""
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), now, 0) for k, v in metrics.items()],
                     params=[mlflow.entities.Param(k, str(v)) for k, v in params.items()])


def artifact_store(run: mlflow.entities.Run):
    """The artifact repository of ``run``, written directly (MlflowClient.log_* looks the
    run up again for every artifact)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    return get_artifact_repository(run.info.artifact_uri)


def log_json(store, obj: Any, artifact_file: str) -> None:
    """``obj`` as the JSON artifact ``artifact_file`` (a path inside the run) of an
    :func:`artifact_store`."""
    path = Path(artifact_file)
    with tempfile.TemporaryDirectory(prefix="securemark-artifact-") as tmp:
        local = Path(tmp) / path.name
        local.write_text(json.dumps(obj, indent=2, sort_keys=True))
        store.log_artifact(str(local), path.parent.as_posix() if path.parent != Path(".") else None)


def write_json(obj: Any, path: Path) -> None:
    """Write a metrics/report JSON file (sorted keys, newline at the end)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        json.dump(obj, tmp, indent=2, sort_keys=True, default=float)
        tmp.write("\n")
    os.chmod(tmp.name, 0o644)  # NamedTemporaryFile creates 0600; metrics are for everyone
    os.replace(tmp.name, path)
