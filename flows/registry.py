"""MLflow model registry: log a classifier (tensors only) and fetch one back.

Models are logged as pyfunc "models from code" (``flows/pyfunc_model.py``) with the
safetensors weights as an artifact. SecureMark's own code never loads a registered
model through pyfunc: it downloads the artifacts and reads the weights file as tensors.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from securemark.weights import load_weights

BASE_MODEL = "securemark-base"
CUSTOMER_MODEL = "securemark-customer"
WEIGHTS_ARTIFACT = "weights.safetensors"
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


def set_alias(name: str, alias: str, version: str | int) -> None:
    MlflowClient().set_registered_model_alias(name, alias, str(version))


def download_weights(model_uri: str, dst: Path | None = None) -> Path:
    """Download a registered model's weights file (``models:/NAME@ALIAS`` or ``runs:/...``)."""
    dst = Path(dst or tempfile.mkdtemp(prefix="securemark-model-"))
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    found = sorted(local.rglob(WEIGHTS_ARTIFACT))
    if not found:
        raise FileNotFoundError(f"{model_uri} has no {WEIGHTS_ARTIFACT}")
    return found[0]


def load_registered(model_uri: str):
    """Our own registered model, rebuilt from its weights file (tensors only)."""
    return load_weights(download_weights(model_uri))
