"""The vendor's private state: secret, codebook, key and ledger, opened from params.

Where it lives (never in git, never in a customer artifact):
- the secret: ``vendor.secret_file`` (default ``~/.securemark/vendor.key``), or the path
  in ``SECUREMARK_SECRET_FILE``; created once, mode 0600, when ``vendor.create_secret``
  is true and it does not exist yet;
- the ledger (SQLite) and a cached codebook: ``vendor.state_dir`` (default ``vendor/``
  in the project, git-ignored), or ``SECUREMARK_VENDOR_DIR``.
The codebook's seed is derived from the secret, so the codebook can be rebuilt by the
vendor and by no one else.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import torch

from flows.project import Paths, section
from securemark.codes import Codebook, create_code
from securemark.fingerprint import EmbedConfig
from securemark.key import FingerprintKey, create_secret, derive_seed, key_id, load_secret
from securemark.ledger import Ledger

log = logging.getLogger(__name__)


def secret_file(paths: Paths, params: dict) -> Path:
    """The secret's path; a relative one is taken from the project root."""
    configured = os.environ.get("SECUREMARK_SECRET_FILE") or params.get("vendor", {}).get("secret_file", "~/.securemark/vendor.key")
    path = Path(configured).expanduser()
    return path if path.is_absolute() else paths.root / path


def state_dir(paths: Paths, params: dict) -> Path:
    configured = os.environ.get("SECUREMARK_VENDOR_DIR") or params.get("vendor", {}).get("state_dir", "vendor")
    path = Path(configured).expanduser()
    return path if path.is_absolute() else paths.root / path


def embed_config(params: dict) -> EmbedConfig:
    values = {k: v for k, v in section(params, "fingerprint").items() if k != "code"}
    return EmbedConfig(**values)


@dataclass
class Vendor:
    """Opened vendor state; ``n_weights`` is the size of the fingerprinted layer."""

    secret: bytes
    codebook: Codebook
    ledger: Ledger
    key: FingerprintKey
    embed: EmbedConfig

    @cached_property
    def key_matrix(self) -> torch.Tensor:
        return self.key.matrix(self.secret)

    @classmethod
    def open(cls, paths: Paths, params: dict, n_weights: int) -> "Vendor":
        secret_path = secret_file(paths, params)
        if not secret_path.exists() and params.get("vendor", {}).get("create_secret", True):
            log.warning("creating the vendor secret %s (first use); back it up: without it no copy can be traced", secret_path)
            create_secret(secret_path)
        secret = load_secret(secret_path)
        code = dict(section(params, "fingerprint")["code"])
        family, capacity = code.pop("family"), int(code.pop("capacity"))
        seed = derive_seed(secret, "codebook")
        codebook_id = f"{family}-{key_id(secret)}-{capacity}-" + "-".join(f"{k}={v}" for k, v in sorted(code.items()))
        directory = state_dir(paths, params)
        cache = directory / "codebook.npz"
        codebook = None
        if cache.exists():
            cached = Codebook.load(cache)
            if cached.params.get("codebook_id") == codebook_id:
                codebook = cached
        if codebook is None:
            generated = create_code(family, **code).generate(capacity, seed)
            codebook = replace(generated, params={**generated.params, "codebook_id": codebook_id})
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            codebook.save(cache)
            cache.chmod(0o600)
        ledger = Ledger(directory / "ledger.sqlite", capacity=len(codebook), codebook_id=codebook_id)
        cfg = embed_config(params)
        key = FingerprintKey.for_secret(secret, cfg.layer, codebook.length, n_weights)
        return cls(secret, codebook, ledger, key, cfg)
