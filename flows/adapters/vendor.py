"""The vendor's private state: secret, codebook, key and ledger, opened from settings.

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
from dataclasses import dataclass, replace
from functools import cached_property

import torch

from flows.adapters.paths import Paths
from flows.adapters.settings import Settings
from securemark.codes import Codebook, create_code
from securemark.fingerprint import EmbedConfig, Readout, readout_size
from securemark.key import FingerprintKey, create_secret, derive_seed, key_id, load_secret
from securemark.ledger import Ledger
from securemark.storage import read_partition
from securemark.tracing import Extractor
from securemark.weights import load_weights

log = logging.getLogger(__name__)


@dataclass
class Vendor:
    """Opened vendor state; ``key.n_weights`` is the size of the fingerprinted layer."""

    secret: bytes
    codebook: Codebook
    ledger: Ledger
    key: FingerprintKey
    embed: EmbedConfig

    @cached_property
    def key_matrix(self) -> torch.Tensor:
        return self.key.matrix(self.secret)

    def customers_by_index(self) -> dict[int, str]:
        """Code-word index -> customer id, for every word the ledger has assigned."""
        return {r.codeword_index: r.customer_id for r in self.ledger.records()}

    def issued_codewords(self) -> dict[str, int]:
        """Customer id -> code-word index, for every issued copy."""
        return {r.customer_id: r.codeword_index for r in self.ledger.records("issued")}

    @classmethod
    def open(cls, paths: Paths, settings: Settings) -> "Vendor":
        secret_path = paths.secret_file(settings.vendor.secret_file)
        if not secret_path.exists() and settings.vendor.create_secret:
            log.warning("creating the vendor secret %s (first use); back it up: without it no copy can be traced", secret_path)
            create_secret(secret_path)
        secret = load_secret(secret_path)
        code = settings.fingerprint.code
        seed = derive_seed(secret, "codebook")
        codebook_id = f"{code.family}-{key_id(secret)}-{code.capacity}-" + "-".join(f"{k}={v}" for k, v in sorted(code.options.items()))
        directory = paths.vendor_dir(settings.vendor.state_dir)
        cache = directory / "codebook.npz"
        codebook = None
        if cache.exists():
            cached = Codebook.load(cache)
            if cached.params.get("codebook_id") == codebook_id:
                codebook = cached
        if codebook is None:
            generated = create_code(code.family, **code.options).generate(code.capacity, seed)
            codebook = replace(generated, params={**generated.params, "codebook_id": codebook_id})
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            codebook.save(cache)
            cache.chmod(0o600)
        ledger = Ledger(directory / "ledger.sqlite", capacity=len(codebook), codebook_id=codebook_id)
        embed = settings.fingerprint.embed
        n_weights = readout_size(settings.model, embed.layer, embed.readout, embed.rank)
        key = FingerprintKey.for_secret(secret, embed.layer, codebook.length, n_weights)
        return cls(secret, codebook, ledger, key, embed)


def probe_images(paths: Paths, settings: Settings):
    """The vendor's probe: the first ``trace.probe_size`` images of its ``aux`` partition."""
    return read_partition(paths.partition("aux")).as_float()[: settings.trace.probe_size]


def make_extractor(paths: Paths, settings: Settings, vendor: Vendor) -> Extractor:
    """The vendor's extractor: its key, its base model, and its probe images (alignment
    and the response readout). Built once per process for the same base model file,
    probe and key (building costs a few eigendecompositions), then reused."""
    stat = paths.base_model.stat()
    embed = settings.fingerprint.embed
    return _extractor(paths, settings.model, str(paths.base_model), stat.st_mtime_ns, stat.st_size, settings.trace.probe_size,
                      settings.trace.align, embed.layer, embed.readout, embed.rank, vendor)


_EXTRACTORS: dict[tuple, Extractor] = {}


def _extractor(paths: Paths, spec, base_file: str, mtime: int, size: int, probe_size: int, align: bool, layer: str, readout: str,
               rank: int, vendor: Vendor) -> Extractor:
    key = (base_file, mtime, size, probe_size, align, layer, readout, rank, vendor.key.key_id, vendor.key.code_length, str(paths.root))
    if key not in _EXTRACTORS:
        base = load_weights(paths.base_model)
        probe = read_partition(paths.partition("aux")).as_float()[:probe_size]
        _EXTRACTORS.clear()  # one base model at a time
        _EXTRACTORS[key] = Extractor(spec, Readout.build(readout, base, layer, probe, rank), vendor.key_matrix, base, probe, align)
    return _EXTRACTORS[key]
