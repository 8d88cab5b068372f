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

import hashlib
import json
import logging
import threading
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from flows.adapters.paths import Paths
from flows.adapters.settings import Settings, attack_options
from securemark.attacks import AttackData, create_attack
from securemark.blackbox import ApiProbe, KeySet, SymbolBook, make_keys
from securemark.codes import Codebook, create_code
from securemark.fingerprint import EmbedConfig, Readout, effective_weight, readout_size
from securemark.key import FingerprintKey, create_secret, derive_seed, key_id, load_secret
from securemark.ledger import Ledger
from securemark.private_files import write_private
from securemark.storage import read_partition
from securemark.tracing import DriftModel, Extractor, codebook_indices, fit_drift
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
    blackbox_codebook: SymbolBook  # one black-box word per code word of ``codebook`` (same index)

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
        codebook_id = f"{code.family}-{key_id(secret)}-{code.capacity}-" + "-".join(f"{k}={v}" for k, v in sorted(code.options.items()))
        directory = paths.vendor_dir(settings.vendor.state_dir)
        codebook = _cached_codebook(directory / "codebook.npz", codebook_id,
                                    lambda: create_code(code.family, **code.options).generate(code.capacity, derive_seed(secret, "codebook")))
        blackbox_codebook = SymbolBook.generate(code.capacity, settings.blackbox.patterns, derive_seed(secret, "blackbox-codebook"))
        ledger = Ledger(directory / "ledger.sqlite", capacity=len(codebook), codebook_id=codebook_id)
        embed = settings.fingerprint.embed
        n_weights = readout_size(settings.model, embed.layer, embed.readout, embed.rank)
        key = FingerprintKey.for_secret(secret, embed.layer, codebook.length, n_weights)
        return cls(secret, codebook, ledger, key, embed, blackbox_codebook)


def _cached_codebook(cache: Path, codebook_id: str, generate) -> Codebook:
    """The codebook in ``cache`` if it is the one ``codebook_id`` names, else a freshly
    generated one, saved there (atomically, owner-only). A damaged cache is rebuilt."""
    if cache.exists():
        try:
            cached = Codebook.load(cache)
        except Exception as exc:  # a damaged cache (an old crash, a disk error): rebuild it from the secret
            log.warning("the codebook cache %s is unreadable (%s); rebuilding it from the secret", cache, exc)
            cached = None
        if cached is not None and cached.params.get("codebook_id") == codebook_id:
            return cached
    generated = generate()
    codebook = replace(generated, params={**generated.params, "codebook_id": codebook_id})
    codebook.save(cache)  # atomic, 0600 from the start
    return codebook


_KEYSETS: dict[tuple, KeySet] = {}


def make_keyset(paths: Paths, settings: Settings, vendor: Vendor) -> KeySet:
    """The vendor's black-box keys (built once per process for the same ``aux`` partition)."""
    stat = paths.partition("aux").stat()
    bb = settings.blackbox
    key = (str(paths.partition("aux")), stat.st_mtime_ns, stat.st_size, bb.patterns, bb.per_pattern, bb.blend, bb.cells, vendor.key.key_id,
           str(paths.root))
    if key not in _KEYSETS:
        _KEYSETS.clear()
        _KEYSETS[key] = _keys(paths, settings, vendor.secret)
    return _KEYSETS[key]


def _keys(paths: Paths, settings: Settings, secret: bytes) -> KeySet:
    bb = settings.blackbox
    aux = read_partition(paths.partition("aux")).as_float()
    return make_keys(aux, bb.patterns, bb.per_pattern, derive_seed(secret, "blackbox-keys"), bb.blend, bb.cells)


def api_probe(paths: Paths, settings: Settings, vendor: Vendor, secret: bytes | None = None) -> ApiProbe:
    """How the vendor traces a model by its answers alone: its keys, black-box codebook
    and checkpoints. With ``secret`` (a null secret, for the stages' null tests), the
    keys and words another vendor with that secret would have drawn instead."""
    bb = settings.blackbox
    if secret is None:
        keys, codebook, order_seed = make_keyset(paths, settings, vendor), vendor.blackbox_codebook, derive_seed(vendor.secret, "key-order")
    else:
        keys = _keys(paths, settings, secret)
        codebook = SymbolBook.generate(len(vendor.blackbox_codebook), bb.patterns, derive_seed(secret, "blackbox-codebook"))
        order_seed = derive_seed(secret, "key-order")
    return ApiProbe(keys, codebook, codebook_indices(codebook), bb.checkpoints, bb.repeats, order_seed, bb.explain)


def probe_images(paths: Paths, settings: Settings):
    """The vendor's probe: the first ``trace.probe_size`` images of its ``aux`` partition."""
    return read_partition(paths.partition("aux")).as_float()[: settings.trace.probe_size]


def make_extractor(paths: Paths, settings: Settings, vendor: Vendor, drift: bool = True) -> Extractor:
    """The vendor's extractor: its key, its base model, its probe images (alignment and
    the response readout) and, with ``trace.drift_samples > 0``, its drift model (the
    drift-whitened reading; see :func:`drift_model`; ``drift=False``: without it, for
    callers that only need the readout). Built once per process for the same base model
    file, probe, key and trace settings, then reused."""
    stat = paths.base_model.stat()
    embed, trace = settings.fingerprint.embed, settings.trace
    key = (str(paths.base_model), stat.st_mtime_ns, stat.st_size, trace.probe_size, trace.align, embed.layer, embed.readout, embed.rank,
           vendor.key.key_id, vendor.key.code_length, str(paths.root), drift and trace.drift_samples, trace.drift_shrink, repr(trace.drift_recipes),
           trace.off_data_limit, trace.derived_limit)
    with _EXTRACTOR_LOCK:
        if key not in _EXTRACTORS:
            base = load_weights(paths.base_model)
            probe = read_partition(paths.partition("aux")).as_float()[: trace.probe_size]
            extractor = Extractor(settings.model, Readout.build(embed.readout, base, embed.layer, probe, embed.rank), vendor.key_matrix,
                                  base, probe, trace.align, off_data_limit=trace.off_data_limit,
                                  derived_limit=trace.derived_limit)
            if drift and trace.drift_samples:
                extractor = replace(extractor, drift=drift_model(paths, settings, extractor))
            if len(_EXTRACTORS) >= 2:
                _EXTRACTORS.clear()  # one base model at a time (with and without its drift model)
            _EXTRACTORS[key] = extractor
        return _EXTRACTORS[key]


_EXTRACTORS: dict[tuple, Extractor] = {}
_EXTRACTOR_LOCK = threading.Lock()


def drift_model(paths: Paths, settings: Settings, extractor: Extractor) -> DriftModel:
    """Where the leakers' natural updates move the readout, fitted once per base model and
    cached in the vendor state (``drift-<digest>.safetensors``; the digest covers the base
    model's bytes, the readout, the aux partition and the trace's drift settings).

    The vendor updates its own base model ``trace.drift_samples`` times, cycling through
    ``trace.drift_recipes`` (attacks from the registry), each on a random subset of its
    ``aux`` images as large as the attacker's budget, reads every updated model the way a
    suspect is read (aligned to the base, then the readout) and fits
    :func:`securemark.tracing.fit_drift`. No copy and no code word is involved, so the
    reading it whitens keeps the distribution-free bound."""
    trace, embed = settings.trace, settings.fingerprint.embed
    digest = hashlib.sha256()
    digest.update(paths.base_model.read_bytes())
    for part in sorted(paths.partition("aux").rglob("*")):
        if part.is_file():
            digest.update(part.name.encode() + part.read_bytes())
    digest.update(json.dumps([embed.layer, embed.readout, embed.rank, trace.probe_size, trace.align, trace.drift_samples, trace.drift_shrink,
                              list(trace.drift_recipes), settings.attacker.budget, settings.base.seed], sort_keys=True, default=str).encode())
    cache = paths.vendor_dir(settings.vendor.state_dir) / f"drift-{digest.hexdigest()[:16]}.safetensors"
    if cache.is_file():
        try:
            return DriftModel.from_tensors(load_file(str(cache)))
        except Exception as exc:  # a damaged cache: fit it again
            log.warning("the drift model cache %s is unreadable (%s); fitting it again", cache, exc)
    aux = read_partition(paths.partition("aux"))
    images, labels = aux.as_float(), aux.labels
    size = min(settings.attacker.budget, len(labels))
    generator = torch.Generator().manual_seed(settings.base.seed)
    updates = []
    for i in tqdm(range(trace.drift_samples), desc="drift model: updating the base model", unit="update"):
        recipe = trace.drift_recipes[i % len(trace.drift_recipes)]
        pick = torch.randperm(len(labels), generator=generator)[:size]
        updated = create_attack(recipe["attack"], **attack_options(recipe))([extractor.reference], AttackData(images[pick], labels[pick]), generator)
        aligned, _ = extractor.aligned(updated)
        with torch.no_grad():
            updates.append(extractor.readout.features(aligned).detach().to(torch.float64))
    rows = int(effective_weight(extractor.reference, embed.layer).shape[0])
    model = fit_drift(torch.stack(updates), rows, trace.drift_shrink)
    write_private(cache, lambda handle: handle.write(save(model.tensors())))
    log.info("drift model fitted to %d updates of the base model; cached in %s", len(updates), cache)
    return model


_SPACES: dict[tuple, tuple] = {}
_SPACE_LOCK = threading.Lock()


def carrier_space(paths: Paths, settings: Settings, vendor: Vendor, base_file: Path | None = None):
    """What every customer's embedding shares (:class:`securemark.embedding.CarrierSpace`)
    and the test set projected into it, built once per process for the same base model,
    bank, key and black-box keys (a thread pool's tasks or a Dask worker's share it).
    Returns ``(space, test_rows, test_labels)``."""
    from securemark.blackbox import key_views
    from securemark.embedding import CarrierSpace
    from securemark.fingerprint import carrier_inputs

    base_file = Path(base_file or paths.base_model)
    stat, bank_stat = base_file.stat(), paths.bank("defended").stat()
    embed = settings.fingerprint.embed
    cache_key = (str(base_file), stat.st_mtime_ns, stat.st_size, bank_stat.st_mtime_ns, vendor.key.key_id, repr(embed),
                 repr(settings.blackbox), str(paths.root))
    with _SPACE_LOCK:
        if cache_key not in _SPACES:
            base = load_weights(base_file).eval()
            bank = load_file(str(paths.bank("defended")))
            rows = embed.eval_rows + embed.train_rows
            pick = torch.randperm(len(bank["labels"]), generator=torch.Generator().manual_seed(0))[:rows]  # a fixed sample of the bank
            inputs = carrier_inputs(base, embed.layer, bank["features"][pick])
            keys = {}
            if settings.blackbox.enabled:
                keyset = make_keyset(paths, settings, vendor)
                key_inputs, key_index, original = key_views(base, embed.layer, keyset, settings.blackbox.views,
                                                            derive_seed(vendor.secret, "key-views"))
                keys = dict(key_inputs=key_inputs, key_index=key_index, key_original=original)
            aux = read_partition(paths.partition("aux"))  # the vendor's own clean images: checked and kept, like the bank
            with torch.no_grad():
                aux_features = torch.cat([base.client(aux.as_float()[i : i + 1000]) for i in range(0, len(aux.labels), 1000)])
            natural = dict(natural_inputs=carrier_inputs(base, embed.layer, aux_features), natural_labels=aux.labels)
            readout = make_extractor(paths, settings, vendor, drift=False).readout
            space = CarrierSpace.build(base, readout, vendor.key_matrix, inputs, bank["labels"][pick], embed,
                                       derive_seed(vendor.secret, "embed-split"), **keys, **natural)
            test = read_partition(paths.partition("test"))
            with torch.no_grad():
                features = torch.cat([base.client(test.as_float()[i : i + 1000]) for i in range(0, len(test.labels), 1000)])
            test_rows = space.project(carrier_inputs(base, embed.layer, features))
            _SPACES.clear()  # one base model at a time
            _SPACES[cache_key] = (space, test_rows, test.labels)
        return _SPACES[cache_key]
