"""MLflow model registry: log a classifier (tensors only) and fetch one back.

Models are logged as pyfunc "models from code" (``flows/pyfunc_model.py``) with the
safetensors weights as an artifact. SecureMark's own code never loads a registered
model through pyfunc: it downloads the artifacts and reads the weights file as tensors.
"""

from __future__ import annotations

import shutil
from datetime import datetime, timezone
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from flows.adapters.tracking import artifact_store
from securemark.errors import InvalidModel
from securemark.weights import load_weights

BASE_MODEL = "securemark-base"
CUSTOMER_MODEL = "securemark-customer"
WEIGHTS_ARTIFACT = "weights.safetensors"
WEIGHTS_DIR = "artifacts"  # where mlflow.pyfunc.save_model puts an artifact inside the model folder
_CODE = Path(__file__).with_name("pyfunc_model.py")
_REQUIREMENTS = ["torch==2.14.1", "numpy", "safetensors", "securemark"]


def log_classifier(weights: Path, registered_name: str | None = None, tags: dict[str, str] | None = None):
    """Log ``weights`` as a model in the active run; register it when a name is given.

    Returns the ModelVersion (registered) or the ModelInfo (not registered).
    """
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / WEIGHTS_ARTIFACT  # one stable artifact name, whatever the file is called
        shutil.copyfile(weights, staged)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(_CODE),
            artifacts={"weights": str(staged)},
            pip_requirements=_REQUIREMENTS,
        )
    if registered_name is None:
        return info
    version = mlflow.register_model(info.model_uri, registered_name, tags=tags)
    return version


@contextmanager
def pyfunc_template() -> Iterator[Path]:
    """A pyfunc model folder (MLmodel, environment, the loader's code) without weights,
    written once by ``mlflow.pyfunc.save_model`` for a run of registrations and removed
    after: every copy's model is this folder plus its own weights file, so registering a
    copy writes no new model code."""
    with tempfile.TemporaryDirectory(prefix="securemark-pyfunc-") as tmp:
        placeholder = Path(tmp) / WEIGHTS_ARTIFACT
        placeholder.write_bytes(b"")
        folder = Path(tmp) / "model"
        mlflow.pyfunc.save_model(path=str(folder), python_model=str(_CODE), artifacts={"weights": str(placeholder)},
                                 pip_requirements=_REQUIREMENTS)
        inside = folder / WEIGHTS_DIR / WEIGHTS_ARTIFACT
        if not inside.is_file():
            raise RuntimeError(f"mlflow.pyfunc.save_model did not put the weights artifact at {inside.relative_to(folder)}")
        inside.unlink()  # each version adds its own (register_weights)
        yield folder


def ensure_registered_model(name: str, client: MlflowClient | None = None) -> None:
    """Create the registered model ``name`` unless it exists (once per run of registrations)."""
    try:
        (client or MlflowClient()).create_registered_model(name)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def register_weights(weights: Path, registered_name: str, tags: dict[str, str], template: Path, run, client: MlflowClient | None = None):
    """Register ``weights`` as a new version of ``registered_name`` (which must exist:
    :func:`ensure_registered_model`) from ``run`` (a :class:`mlflow.entities.Run`): the run's
    artifacts get the pyfunc folder (``template``, from :func:`pyfunc_template`) and this file
    as its weights, and the version points at them. Same model as :func:`log_classifier`
    logs, at a fraction of the cost: no model code is re-packaged per copy, and the run's
    artifact store is written directly (no run lookup per artifact)."""
    client = client or MlflowClient()
    store = artifact_store(run)
    store.log_artifacts(str(template), "model")
    with tempfile.TemporaryDirectory(prefix="securemark-version-") as tmp:
        staged = Path(tmp) / WEIGHTS_ARTIFACT  # one stable artifact name, whatever the file is called
        shutil.copyfile(weights, staged)
        store.log_artifact(str(staged), f"model/{WEIGHTS_DIR}")
    return client.create_model_version(registered_name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id, tags=tags)


def set_alias(name: str, alias: str, version: str | int) -> None:
    MlflowClient().set_registered_model_alias(name, alias, str(version))


def download_weights(model_uri: str, dst: Path) -> Path:
    """Download a registered model's weights file (``models:/NAME@ALIAS`` or ``runs:/...``)
    into the folder ``dst`` (the caller's, which the caller removes)."""
    dst = Path(dst)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    found = sorted(local.rglob(WEIGHTS_ARTIFACT))
    if not found:
        raise FileNotFoundError(f"{model_uri} has no {WEIGHTS_ARTIFACT}")
    return found[0]


def resolve_model(model: str, workdir: Path) -> Path:
    """A local file for ``model``: a path as it is, or a ``models:/`` / ``runs:/`` URI
    downloaded into ``workdir``."""
    if model.startswith(("models:/", "runs:/")):
        try:
            return download_weights(model, workdir)
        except Exception as exc:  # MLflow raises several types for unknown names/aliases
            raise InvalidModel(f"cannot fetch {model} from the MLflow registry: {str(exc).splitlines()[0]}") from None
    return Path(model)


def load_registered(model_uri: str):
    """Our own registered model, rebuilt from its weights file (tensors only); nothing
    downloaded is left behind."""
    with tempfile.TemporaryDirectory(prefix="securemark-model-") as tmp:
        return load_weights(download_weights(model_uri, Path(tmp)))


def customer_table(ledger_records: list, client: MlflowClient | None = None) -> list[dict]:
    """Ledger records joined with the registry: one row per customer with the model
    version its alias ``customer-<id>`` points to now (``None`` if it has none), the
    key id, the issue time and whether the registry agrees with the ledger."""
    client = client or MlflowClient()
    rows = []
    for record in ledger_records:
        try:
            version = client.get_model_version_by_alias(CUSTOMER_MODEL, f"customer-{record.customer_id}")
        except mlflow.exceptions.MlflowException:
            version = None
        registry_version = None if version is None else str(version.version)
        rows.append({
            "customer_id": record.customer_id,
            "status": record.status,
            "model_version": registry_version,
            "key_id": record.key_id,
            "issued_at": record.issued_at,
            "registered_at": None if version is None else datetime.fromtimestamp(version.creation_timestamp / 1000, timezone.utc).isoformat(timespec="seconds"),
            "in_sync": registry_version == record.model_version and (version is None or version.tags.get("weights_sha256") == record.weights_sha256),
        })
    return rows
