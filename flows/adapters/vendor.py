"""Opening the vendor (:class:`securemark.vendor.Vendor`) from the project's paths and params.

Where its state lives (never in git, never in a customer artifact):
- the secret: ``vendor.secret_file`` (default ``~/.securemark/vendor.key``), or the path
  in ``SECUREMARK_SECRET_FILE``; created once, mode 0600, when ``vendor.create_secret``
  is true and it does not exist yet;
- the ledger (SQLite), the cached codebook and the persisted derived objects (extractor,
  drift model, carrier space): ``vendor.state_dir`` (default ``vendor/`` in the project,
  git-ignored), or ``SECUREMARK_VENDOR_DIR``.
The codebook's seed is derived from the secret, so the codebook can be rebuilt by the
vendor and by no one else.
"""

from __future__ import annotations

from flows.adapters.paths import Paths
from flows.adapters.settings import Settings
from securemark.vendor import Vendor, VendorConfig, VendorFiles

__all__ = ["open_vendor", "vendor_config", "vendor_files"]


def vendor_files(paths: Paths, settings: Settings) -> VendorFiles:
    """Where the vendor's secret, state and data live, for this project."""
    return VendorFiles(secret=paths.secret_file(settings.vendor.secret_file), state_dir=paths.vendor_dir(settings.vendor.state_dir),
                       base_model=paths.base_model, aux=paths.partition("aux"), test=paths.partition("test"), bank=paths.bank("defended"),
                       create_secret=settings.vendor.create_secret)


def vendor_config(settings: Settings) -> VendorConfig:
    """The core configs the vendor is built from (sections fingerprint, blackbox, trace, model)."""
    return VendorConfig(model=settings.model, code=settings.fingerprint.code, embed=settings.fingerprint.embed, blackbox=settings.blackbox,
                        trace=settings.trace, drift_subset=settings.attacker.budget, seed=settings.base.seed)


def open_vendor(paths: Paths, settings: Settings) -> Vendor:
    """The project's vendor (its secret created on first use when the params allow it)."""
    return Vendor.open(vendor_files(paths, settings), vendor_config(settings))
