"""Where things live and what the params say: named once, here.

The project root is the working directory (``dvc repro`` runs stages from the repo
root) unless ``SECUREMARK_ROOT`` says otherwise. Every path a flow reads or writes
comes from :class:`Paths`, and ``dvc.yaml`` names the same paths for DVC.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from securemark.errors import ConfigError


@dataclass(frozen=True)
class Paths:
    root: Path

    @classmethod
    def from_env(cls) -> "Paths":
        return cls(Path(os.environ.get("SECUREMARK_ROOT", Path.cwd())).resolve())

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def partitions(self) -> Path:
        return self.root / "data" / "partitions"

    def partition(self, name: str) -> Path:
        return self.partitions / name

    @property
    def models(self) -> Path:
        return self.root / "data" / "models"

    @property
    def features(self) -> Path:
        return self.root / "data" / "features"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlruns(self) -> Path:
        return self.root / "mlruns"


def load_params(path: Path) -> dict[str, Any]:
    """Read params.yaml; a missing file or a non-mapping is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "file not found")
    params = yaml.safe_load(path.read_text()) or {}
    if not isinstance(params, dict):
        raise ConfigError(str(path), "top level must be a mapping of sections")
    return params


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    """One params section as a dict; missing sections are an error naming the key."""
    value = params.get(name)
    if not isinstance(value, dict):
        raise ConfigError(name, "section missing or not a mapping")
    return value


def build(cls, params: dict[str, Any], name: str, exclude: tuple[str, ...] = (), **extra):
    """Turn a params section into a frozen dataclass; unknown keys are named.

    ``exclude``: keys of the section that the flow reads itself; ``extra``: values
    from elsewhere (e.g. the shared seed)."""
    values = {k: v for k, v in section(params, name).items() if k not in exclude}
    fields = cls.__dataclass_fields__
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]}", f"unknown key; valid keys: {sorted(fields)}")
    values.update(extra)
    return cls(**values)
