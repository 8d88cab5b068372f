"""Where things live: every path a flow reads or writes is named once, here.

The project root is the working directory (``dvc repro`` runs stages from the repo
root) unless ``SECUREMARK_ROOT`` says otherwise. ``dvc.yaml`` names the same paths for
DVC; ``data/README.md`` describes what the pipeline writes under ``data/``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

VARIANTS = ("defended", "undefended")
SECRET_FILE_ENV = "SECUREMARK_SECRET_FILE"
VENDOR_DIR_ENV = "SECUREMARK_VENDOR_DIR"
ROOT_ENV = "SECUREMARK_ROOT"


@dataclass(frozen=True)
class Paths:
    root: Path

    @classmethod
    def from_env(cls) -> "Paths":
        return cls(Path(os.environ.get(ROOT_ENV, Path.cwd())).resolve())

    # ------------------------------------------------------------------ params
    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    # ------------------------------------------------------------------ data
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

    def model(self, variant: str = "defended") -> Path:
        """The split-trained model of ``variant`` (``defended`` is the base every copy comes from)."""
        return self.models / f"{variant}.safetensors"

    @property
    def base_model(self) -> Path:
        return self.model("defended")

    @property
    def attacker_alone(self) -> Path:
        """The attacker-alone models (one per budget): a DVC output folder."""
        return self.models / "attacker_alone"

    def attacker_alone_model(self, budget: int) -> Path:
        """The model the attacker trains alone on ``budget`` of its images (the baseline)."""
        return self.attacker_alone / f"{budget}.safetensors"

    @property
    def features(self) -> Path:
        return self.root / "data" / "features"

    def bank(self, variant: str = "defended") -> Path:
        """The smashed features (and labels) the vendor received from the owners."""
        return self.features / f"{variant}_bank.safetensors"

    @property
    def customers(self) -> Path:
        return self.root / "data" / "customers"

    def customer_copy(self, customer_id: str) -> Path:
        """The deliverable of ``customer_id``: weights only (safetensors)."""
        return self.customers / customer_id / "model.safetensors"

    def issued_copies(self) -> list[Path]:
        """Every customer copy on disk, sorted by customer id."""
        return sorted(self.customers.glob("*/model.safetensors"))

    # ------------------------------------------------------------------ metrics and reports
    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    def train_metrics(self, variant: str = "defended") -> Path:
        return self.metrics / ("train.json" if variant == "defended" else f"train_{variant}.json")

    @property
    def attacker_baseline(self) -> Path:
        return self.metrics / "attacker_baseline.json"

    @property
    def fingerprint_metrics(self) -> Path:
        return self.metrics / "fingerprint.json"

    @property
    def privacy_metrics(self) -> Path:
        return self.metrics / "privacy.json"

    @property
    def trace_metrics(self) -> Path:
        return self.metrics / "trace.json"

    @property
    def blackbox_metrics(self) -> Path:
        return self.metrics / "blackbox.json"

    @property
    def attack_rows(self) -> Path:
        return self.metrics / "attacks.csv"

    @property
    def attack_summary(self) -> Path:
        return self.metrics / "attacks.json"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def validation_report(self) -> Path:
        return self.reports / "validation.json"

    @property
    def privacy_grid(self) -> Path:
        return self.reports / "privacy_grid.png"

    # ------------------------------------------------------------------ tracking
    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def trace_outbox(self) -> Path:
        """Trace records waiting for their MLflow run (flows.adapters.trace_log)."""
        return self.root / ".securemark-outbox"

    @property
    def mlruns(self) -> Path:
        return self.root / "mlruns"

    # ------------------------------------------------------------------ vendor state
    def _configured(self, env: str, configured: str) -> Path:
        path = Path(os.environ.get(env) or configured).expanduser()
        return path if path.is_absolute() else self.root / path

    def secret_file(self, configured: str) -> Path:
        """The vendor secret: ``SECUREMARK_SECRET_FILE``, else ``vendor.secret_file``
        (a relative path is taken from the project root)."""
        return self._configured(SECRET_FILE_ENV, configured)

    def vendor_dir(self, configured: str) -> Path:
        """Ledger and codebook cache: ``SECUREMARK_VENDOR_DIR``, else ``vendor.state_dir``."""
        return self._configured(VENDOR_DIR_ENV, configured)
