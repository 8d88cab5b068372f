"""The vendor as a service: its secret state, what it derives from it, and its use cases.

A :class:`Vendor` is opened from :class:`~securemark.vendor.config.VendorFiles` (where the
secret, the state and the vendor's data live) and a
:class:`~securemark.vendor.config.VendorConfig` (the core configs). It owns:

- the secret, both codebooks (weights and black-box words, same index per customer),
  the fingerprint key and the customer ledger;
- the expensive objects derived from them, as explicit cached members: the extractor
  (readout and aligner), the drift model, the black-box keys and the carrier space every
  customer's embedding shares. The costly ones are persisted in the vendor's state
  folder (:mod:`securemark.vendor.cache`), keyed by what they are computed from (the
  base model's bytes, the vendor's data, the key id, the configs), so a later process
  loads them instead of rebuilding them;
- the use cases: :meth:`embed` (issuing), :meth:`trace_weights` (a model file's
  tensors), :meth:`trace_api` (a prediction API), :meth:`null_verdict` (a model under
  the vendor's or another vendor's key) and :meth:`evaluate_attacked` (an attacked model
  judged through both channels, as the attack grid does).

Entry points (stages, the CLI, deployments, benchmarks) read settings, open a Vendor,
call a use case and log what it returns; files other than the vendor's own state
(copies, reports, MLflow) are theirs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from securemark.alignment import Aligner
from securemark.attacks import AttackData, create_attack
from securemark.tracing.blackbox import (ApiProbe, BlackboxVerdict, KeySet, SymbolBook, agreement, key_views, label_api, make_keys,
                                         natural_keys, sequential_trace, shed, targets)
from securemark.codes import Codebook, create_code
from securemark.embedding import CarrierSpace, Job, Outcome, Projected, changes_only_carrier, copy_accuracy, embed_batch
from securemark.errors import InvalidInput
from securemark.fingerprint import EmbeddingFailed, Readout, carrier_inputs, effective_weight, readout_size
from securemark.key import FingerprintKey, create_secret, derive_seed, draw_key, key_id, load_secret
from securemark.ledger import Ledger
from securemark.model import SplitNet, accuracy
from securemark.storage import read_partition
from securemark.training import augment
from securemark.tracing import (OFF_DATA_NOTE, DriftModel, Extractor, Verdict, codebook_indices, decide_readings, degeneracy, fit_drift,
                                no_verdict, suspect_outputs_finite)
from securemark.vendor.cache import file_digest, folder_digest, persisted
from securemark.vendor.config import BlackboxConfig, TraceConfig, VendorConfig, VendorFiles, recipe_options
from securemark.weights import load_weights

log = logging.getLogger(__name__)

__all__ = ["ApiTrace", "Vendor", "WeightsTrace"]


@dataclass(frozen=True)
class WeightsTrace:
    """A model's tensors, read and decided (:meth:`Vendor.trace_weights`)."""

    verdict: Verdict
    alignment: dict                # per block: how the suspect was re-aligned (empty when it was not)
    off_data_ratio: float          # carrying-layer energy where data does not look, x the base's (NaN: not read)
    obfuscated: bool               # an update of the base obfuscated where data does not look
    inconclusive_reason: str = ""  # obfuscated | degenerate ("" when the verdict says something)

    @property
    def inconclusive(self) -> bool:
        """No one accused, and that says nothing about the model."""
        return bool(self.inconclusive_reason)


@dataclass(frozen=True)
class ApiTrace:
    """A prediction API, queried with the secret keys and decided (:meth:`Vendor.trace_api`)."""

    result: BlackboxVerdict
    limit: int  # the most queries the read could spend

    @property
    def inconclusive_reason(self) -> str:
        return "under-powered" if self.result.inconclusive else ""


class Vendor:
    """Opened vendor state (see the module docstring); ``key.n_weights`` is the size of
    the fingerprinted layer's readout."""

    def __init__(self, files: VendorFiles, config: VendorConfig, secret: bytes, codebook: Codebook, blackbox_codebook: SymbolBook,
                 ledger: Ledger, key: FingerprintKey) -> None:
        self.files, self.config = files, config
        self.secret, self.codebook, self.blackbox_codebook, self.ledger, self.key = secret, codebook, blackbox_codebook, ledger, key
        self._extractors: dict[bool, Extractor] = {}
        self._spaces: dict[str, tuple[CarrierSpace, Projected, torch.Tensor]] = {}

    @classmethod
    def open(cls, files: VendorFiles, config: VendorConfig) -> "Vendor":
        """The vendor whose secret is ``files.secret`` (created on first use when
        ``files.create_secret``; the codebook is cached in the state folder)."""
        if not files.secret.exists() and files.create_secret:
            log.warning("creating the vendor secret %s (first use); back it up: without it no copy can be traced", files.secret)
            create_secret(files.secret)
        secret = load_secret(files.secret)
        code = config.code
        codebook_id = f"{code.family}-{key_id(secret)}-{code.capacity}-" + "-".join(f"{k}={v}" for k, v in sorted(code.options.items()))
        codebook = _cached_codebook(files.state_dir / "codebook.npz", codebook_id,
                                    lambda: create_code(code.family, **code.options).generate(code.capacity, derive_seed(secret, "codebook")))
        bb = config.blackbox
        blackbox_codebook = _blackbox_book(bb, code.capacity, secret)
        ledger = Ledger(files.state_dir / "ledger.sqlite", capacity=len(codebook), codebook_id=codebook_id, blackbox_id=bb.identity)
        embed = config.embed
        n_weights = readout_size(config.model, embed.layer, embed.readout, embed.rank)
        key = FingerprintKey.for_secret(secret, embed.layer, codebook.length, n_weights)
        return cls(files, config, secret, codebook, blackbox_codebook, ledger, key)

    # ------------------------------------------------------------------ state
    @cached_property
    def key_matrix(self) -> torch.Tensor:
        """The fingerprint key ``K``, persisted in the state folder (``key-<digest>.safetensors``):
        drawing it from the secret takes about 0.4 s, reading the file back is a memory map.
        The file is as secret as the secret itself (the state folder is the vendor's, mode 0600)."""
        key = self.key
        digest = self._digest("key", key.to_dict())
        shape = (key.code_length, key.n_weights)
        tensors = persisted(self.files.state_dir, "key", digest, lambda: {"key": key.matrix(self.secret)},
                            check=lambda t: tuple(t.get("key", torch.empty(0)).shape) == shape)
        return tensors["key"]

    def customers_by_index(self) -> dict[int, str]:
        """Code-word index -> customer id, for every word the ledger has assigned."""
        return {r.codeword_index: r.customer_id for r in self.ledger.records()}

    def issued_codewords(self) -> dict[str, int]:
        """Customer id -> code-word index, for every issued copy."""
        return {r.customer_id: r.codeword_index for r in self.ledger.records("issued")}

    # ------------------------------------------------------------------ derived objects
    @cached_property
    def aux_digest(self) -> str:
        """The vendor's ``aux`` partition, by content (keys the persisted objects)."""
        return folder_digest(self.files.aux)

    def _digest(self, *parts) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    @cached_property
    def probe(self) -> torch.Tensor:
        """The vendor's probe: the first ``trace.probe_size`` images of its ``aux`` partition."""
        return read_partition(self.files.aux).as_float()[: self.config.trace.probe_size]

    @cached_property
    def keyset(self) -> KeySet:
        """The vendor's black-box keys: secret patterns blended into its ``aux`` images, or
        (``blackbox.family: natural``) ``aux`` images its base model is unsure of."""
        return self._keys(self.secret)

    def _keys(self, secret: bytes) -> KeySet:
        bb = self.config.blackbox
        aux = read_partition(self.files.aux).as_float()
        seed = derive_seed(secret, "blackbox-keys")
        if bb.family == "natural":
            return natural_keys(aux, self._aux_probabilities, bb.natural_keys, seed, bb.natural_pool)
        return make_keys(aux, bb.patterns, bb.per_pattern, seed, bb.blend, bb.cells)

    @cached_property
    def _aux_probabilities(self) -> torch.Tensor:
        """The base model's class probabilities on the ``aux`` images (natural keys' candidates)."""
        base = load_weights(self.files.base_model).eval()
        aux = read_partition(self.files.aux).as_float()
        with torch.no_grad():
            return torch.cat([base(aux[i : i + 2048]).softmax(1) for i in range(0, len(aux), 2048)])

    def api_probe(self, secret: bytes | None = None) -> ApiProbe:
        """How the vendor traces a model by its answers alone: its keys, black-box codebook
        and checkpoints. With ``secret`` (a null secret, for the stages' null tests), the
        keys and words another vendor with that secret would have drawn instead."""
        bb = self.config.blackbox
        if secret is None:
            keys, codebook, order_seed = self.keyset, self.blackbox_codebook, derive_seed(self.secret, "key-order")
        else:
            keys = self._keys(secret)
            codebook = _blackbox_book(bb, len(self.blackbox_codebook), secret)
            order_seed = derive_seed(secret, "key-order")
        return ApiProbe(keys, codebook, codebook_indices(codebook), bb.checkpoints, bb.repeats, order_seed, bb.explain)

    def extractor(self, drift: bool = True) -> Extractor:
        """The vendor's extractor: its key, its base model, its probe images (alignment and
        the response readout) and, with ``drift`` and ``trace.drift_samples > 0``, its
        drift model (:meth:`drift_model`). The readout and the aligner are persisted
        (``extractor-<digest>.safetensors``, keyed by the base model's bytes, the aux
        images and the reading's settings); built once per Vendor."""
        drift = bool(drift and self.config.trace.drift_samples)
        if drift not in self._extractors:
            trace, embed = self.config.trace, self.config.embed
            base = load_weights(self.files.base_model)
            probe = self.probe
            digest = self._digest("extractor", file_digest(self.files.base_model), self.aux_digest, embed.layer, embed.readout, embed.rank,
                                  trace.probe_size)

            def build() -> dict[str, torch.Tensor]:
                readout = Readout.build(embed.readout, base, embed.layer, probe, embed.rank)
                tensors = {f"readout.{k}": v for k, v in readout.tensors().items()}
                if trace.align:
                    tensors.update({f"aligner.{k}": v for k, v in Aligner(base, probe).tensors().items()})
                return tensors

            tensors = persisted(self.files.state_dir, "extractor", digest, build, check=lambda t: not trace.align or "aligner.head" in t)
            readout = Readout.from_tensors(embed.layer, _prefixed(tensors, "readout."))
            aligner = Aligner.from_tensors(base, probe, _prefixed(tensors, "aligner.")) if trace.align else None
            extractor = Extractor(self.config.model, readout, self.key_matrix, base, probe, trace.align, off_data_limit=trace.off_data_limit,
                                  derived_limit=trace.derived_limit, prepared_aligner=aligner)
            if drift:
                extractor = replace(extractor, drift=self.drift_model(extractor))
            self._extractors[drift] = extractor
        return self._extractors[drift]

    def drift_model(self, extractor: Extractor) -> DriftModel:
        """Where the leakers' natural updates move the readout, fitted once per base model and
        persisted (``drift-<digest>.safetensors``; the digest covers the base model's bytes,
        the readout, the aux partition and the trace's drift settings).

        The vendor updates its own base model ``trace.drift_samples`` times, cycling through
        ``trace.drift_recipes`` (attacks from the registry), each on a random subset of its
        ``aux`` images as large as the attacker's budget, reads every updated model the way a
        suspect is read (aligned to the base, then the readout) and fits
        :func:`securemark.tracing.fit_drift`. No copy and no code word is involved, so the
        reading it whitens keeps the distribution-free bound."""
        trace, embed = self.config.trace, self.config.embed
        digest = self._digest("drift", file_digest(self.files.base_model), self.aux_digest, embed.layer, embed.readout, embed.rank,
                              trace.probe_size, trace.align, trace.drift_samples, trace.drift_shrink, list(trace.drift_recipes),
                              self.config.drift_subset, self.config.seed)

        def build() -> dict[str, torch.Tensor]:
            aux = read_partition(self.files.aux)
            images, labels = aux.as_float(), aux.labels
            size = min(self.config.drift_subset, len(labels))
            generator = torch.Generator().manual_seed(self.config.seed)
            updates = []
            for i in tqdm(range(trace.drift_samples), desc="drift model: updating the base model", unit="update"):
                recipe = trace.drift_recipes[i % len(trace.drift_recipes)]
                pick = torch.randperm(len(labels), generator=generator)[:size]
                updated = create_attack(recipe["attack"], **recipe_options(recipe))([extractor.reference], AttackData(images[pick], labels[pick]),
                                                                                   generator)
                aligned, _ = extractor.aligned(updated)
                with torch.no_grad():
                    updates.append(extractor.readout.features(aligned).detach().to(torch.float64))
            rows = int(effective_weight(extractor.reference, embed.layer).shape[0])
            model = fit_drift(torch.stack(updates), rows, trace.drift_shrink)
            log.info("drift model fitted to %d updates of the base model", len(updates))
            return model.tensors()

        return DriftModel.from_tensors(persisted(self.files.state_dir, "drift", digest, build))

    def carrier_space(self, base_file: Path | None = None) -> tuple[CarrierSpace, Projected, torch.Tensor]:
        """What every customer's embedding shares (:class:`securemark.embedding.CarrierSpace`)
        and the test set projected into it: ``(space, test rows, test labels)``. Persisted
        (``carrier-<digest>.safetensors``, without the key matrix, which the secret gives)
        and keyed by the base model's bytes, the bank file, the aux images, the key id and
        the embedding and black-box settings; built once per Vendor and base model."""
        base_file = Path(base_file or self.files.base_model)
        name = str(base_file.resolve())
        if name not in self._spaces:
            embed, bb = self.config.embed, self.config.blackbox
            bank = self.files.bank.stat()
            digest = self._digest("carrier", file_digest(base_file), [str(self.files.bank.resolve()), bank.st_size, bank.st_mtime_ns],
                                  self.aux_digest, folder_digest(self.files.test), self.key.key_id, repr(embed), repr(bb),
                                  self.config.trace.probe_size)
            base = load_weights(base_file).eval()

            def build() -> dict[str, torch.Tensor]:
                space, test_rows, test_labels = self._build_carrier_space(base)
                return {**{f"space.{k}": v for k, v in space.tensors().items()},
                        "test.base": test_rows.base.contiguous(), "test.sub": test_rows.sub.contiguous(), "test.labels": test_labels.contiguous()}

            tensors = persisted(self.files.state_dir, "carrier", digest, build)
            space = CarrierSpace.from_tensors(_prefixed(tensors, "space."), self.config.model, embed.layer, self.key_matrix)
            self._spaces[name] = (space, Projected(tensors["test.base"], tensors["test.sub"]), tensors["test.labels"])
        return self._spaces[name]

    def _build_carrier_space(self, base: SplitNet) -> tuple[CarrierSpace, Projected, torch.Tensor]:
        embed, bb = self.config.embed, self.config.blackbox
        bank = load_file(str(self.files.bank))
        rows = embed.eval_rows + embed.train_rows
        pick = torch.randperm(len(bank["labels"]), generator=torch.Generator().manual_seed(0))[:rows]  # a fixed sample of the bank
        inputs = carrier_inputs(base, embed.layer, bank["features"][pick])
        keys = {}
        if bb.enabled:
            key_inputs, key_index, original = key_views(base, embed.layer, self.keyset, bb.views, derive_seed(self.secret, "key-views"))
            keys = dict(key_inputs=key_inputs, key_index=key_index, key_original=original)
        aux = read_partition(self.files.aux)  # the vendor's own clean images: checked and kept, like the bank
        kept = torch.ones(len(aux.labels), dtype=torch.bool)
        if bb.enabled and bb.family == "natural":
            kept[self.keyset.rows] = False  # a natural key is taught its symbol, not its label
        images = aux.as_float()[kept]
        natural = dict(natural_inputs=carrier_inputs(base, embed.layer, _client_features(base, images)), natural_labels=aux.labels[kept],
                       natural_views=[carrier_inputs(base, embed.layer, _client_features(base, view)) for view in self._natural_views(images)])
        readout = self.extractor(drift=False).readout
        space = CarrierSpace.build(base, readout, self.key_matrix, inputs, bank["labels"][pick], embed, derive_seed(self.secret, "embed-split"),
                                   **keys, **natural)
        test = read_partition(self.files.test)
        test_rows = space.project(carrier_inputs(base, embed.layer, _client_features(base, test.as_float())))
        return space, test_rows, test.labels

    def _natural_views(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``fingerprint.natural_views`` augmented copies (random crop and flip, drawn from
        the secret) of the vendor's clean ``images``, which issuing trains on with their
        labels, so that issuing keeps the copy right around the natural images, not
        only on them. All images get views; :meth:`CarrierSpace.build` trains on those of
        its trained-on half only."""
        g = torch.Generator().manual_seed(derive_seed(self.secret, "natural-views"))
        return [augment(images, g) for _ in range(self.config.embed.natural_views)]

    # ------------------------------------------------------------------ use cases
    def embed(self, customers: list[tuple[str, int]], base_file: Path | None = None, progress=None, width: int | None = None) -> list[Outcome]:
        """Issuing: embed the code words of ``customers`` ((id, code-word index) pairs) into
        copies of the base model, ``width`` at a time in one rolling batch
        (:func:`securemark.embedding.embed_batch`). Each customer's black-box word is
        taught on the vendor's keys. Writes nothing: the caller delivers the copies.

        With natural keys, a copy that cannot keep its accuracy while flipping all its keys
        (some words flip costlier keys than others) is retried once per share in
        ``fingerprint.shed_keys``, each time giving that share of its flips back to the
        base's answer (:func:`~securemark.tracing.blackbox.shed`, the keys the base is
        surest of first); its result says how many (``keys_shed``)."""
        cfg = self.config.embed
        space, _, _ = self.carrier_space(base_file)
        keys = self.keyset if self.config.blackbox.enabled else None
        jobs = [Job(customer_id, self.codebook.word(index), None if keys is None else targets(keys, self.blackbox_codebook.word(index)),
                    derive_seed(self.secret, f"embed|{customer_id}"))
                for customer_id, index in customers]
        outcomes = embed_batch(space, jobs, cfg, progress=progress, width=width)
        if keys is None or keys.candidates is None:
            return outcomes
        probs = self._aux_probabilities[keys.rows]
        words = [self.blackbox_codebook.word(index) for _, index in customers]
        for share in cfg.shed_keys:
            failed = [i for i, o in enumerate(outcomes) if o.error is not None]
            if not failed:
                break
            retry = [replace(jobs[i], key_labels=shed(keys, jobs[i].key_labels, probs, share)) for i in failed]
            log.warning("%d copies could not be made (%s); retrying with %.0f%% of their key flips given back",
                        len(failed), ", ".join(jobs[i].name for i in failed), 100 * share)
            for i, job, outcome in zip(failed, retry, embed_batch(space, retry, cfg, width=width)):
                if outcome.error is None:  # its agreement: with the customer's own symbols, not with what was taught
                    answers = label_api(outcome.result.model)(keys.images)
                    outcome = Outcome(outcome.name, replace(outcome.result, keys_shed=int((job.key_labels != jobs[i].key_labels).sum()),
                                                            key_agreement=agreement(keys, words[i], answers)))
                else:
                    outcome = Outcome(outcome.name, None, EmbeddingFailed(f"{outcomes[i].error}; with {100 * share:.0f}% of the key flips "
                                                                         f"given back: {outcome.error}", steps=outcome.error.steps))
                outcomes[i] = outcome
        return outcomes

    def trace_weights(self, state: dict[str, torch.Tensor], cfg: TraceConfig | None = None) -> WeightsTrace:
        """Tracing through the weights: ``state`` (tensors already examined, see
        :func:`securemark.suspect.examine`) rebuilt, re-aligned to the base model, read
        plain and drift-whitened, and decided at ``cfg.epsilon`` over the whole codebook.
        A suspect that cannot be read (non-finite outputs, degenerate) or that was
        obfuscated where data does not look gives an inconclusive trace, never a clean one."""
        cfg = cfg or self.config.trace
        indices = codebook_indices(self.codebook)
        extractor = self.extractor()
        suspect = extractor.model(state)
        probed = extractor.probe_pass(suspect)  # one forward pass: the outputs both checks read, the activations alignment compares
        note = degenerate = degeneracy(suspect, extractor.probe, self.key.layer, probed.outputs)
        if not suspect_outputs_finite(suspect, extractor.probe, probed.outputs):
            return WeightsTrace(no_verdict(cfg, indices, note), {}, float("nan"), False, "degenerate" if degenerate else "")
        aligned, alignment = extractor.aligned(probed)
        verdict = decide_readings(extractor.readings(aligned), self.codebook, indices, cfg.epsilon, cfg.scorer, cfg.decoder)
        off_data, obfuscated = extractor.off_data_ratio(aligned), extractor.obfuscated(aligned)
        if obfuscated:
            note = " ".join(filter(None, (note, OFF_DATA_NOTE.format(layer=self.key.layer, ratio=off_data, limit=cfg.off_data_limit,
                                                                moved=extractor.readout_change(aligned)))))
        if note:
            verdict = dataclasses.replace(verdict, note=" ".join(filter(None, (note, verdict.note))))
        reason = "obfuscated" if obfuscated else "degenerate" if degenerate else ""
        return WeightsTrace(verdict, alignment, off_data, obfuscated, "" if verdict.accused else reason)

    def query_limit(self, budget: int | None = None) -> int:
        """The most queries a read of an API may spend: every key ``blackbox.repeats``
        times, or ``budget`` if smaller (at least 1)."""
        if budget is not None and budget < 1:
            raise InvalidInput(f"the query budget must be at least 1, got {budget}")
        bb = self.config.blackbox
        return bb.max_queries if budget is None else min(budget, bb.max_queries)

    def trace_api(self, ask: Callable[[torch.Tensor], torch.Tensor], budget: int | None = None, cfg: TraceConfig | None = None) -> ApiTrace:
        """Tracing through an API: ``ask`` (key images -> labels or scores) is queried with
        the secret keys in their secret order until the evidence clears the bound at a
        checkpoint, or ``budget`` (:meth:`query_limit`) is spent. A read too short to accuse
        even an unmodified copy is inconclusive (:func:`securemark.tracing.blackbox.patterns_needed`)."""
        cfg = cfg or self.config.trace
        bb = self.config.blackbox
        limit = self.query_limit(budget)
        keys = self.keyset
        checkpoints = tuple(c for c in bb.checkpoints if c <= limit) or (limit,)
        repeats = max(1, min(bb.repeats, limit // len(keys))) if limit >= len(keys) else 1
        result = sequential_trace(ask, keys, self.blackbox_codebook, codebook_indices(self.blackbox_codebook), cfg.epsilon, checkpoints, repeats,
                                  order_seed=derive_seed(self.secret, "key-order"), explain=bb.explain)
        return ApiTrace(result, limit)

    def null_verdict(self, aligned: SplitNet, secret: bytes | None = None, cfg: TraceConfig | None = None) -> Verdict:
        """The verdict on an already aligned model under the vendor's key, or under the key
        another vendor with ``secret`` would have drawn (a null: its words were never
        embedded there, so no one may be accused)."""
        cfg = cfg or self.config.trace
        extractor = self.extractor()
        # another key is drawn when it is used (a 2048-bit key over the readout is ~270 MB: never hold many)
        key = self.key_matrix if secret is None else draw_key(secret, self.key.layer, self.codebook.length, self.key.n_weights)
        return decide_readings(extractor.readings(aligned, key), self.codebook, codebook_indices(self.codebook), cfg.epsilon, cfg.scorer,
                               cfg.decoder)


    def copy_test_accuracy(self, model: SplitNet, test: tuple[torch.Tensor, torch.Tensor]) -> float:
        """A model's accuracy on the test set ``test`` (images, labels). For an issued copy,
        unchanged since (:func:`securemark.embedding.changes_only_carrier`), it is read from
        the carrier space's projected test rows, exactly and about 100 times faster than
        running the whole network; any other model runs on ``test``."""
        space, rows, labels = self.carrier_space()
        if len(labels) == len(test[1]) and torch.equal(labels, test[1]) and changes_only_carrier(space, model):
            return copy_accuracy(space, model, rows, labels)
        return accuracy(model, *test)

    def evaluate_attacked(self, model, colluders: list[str], test: tuple[torch.Tensor, torch.Tensor], cfg: TraceConfig | None = None) -> dict:
        """An attacked model (a copy, or a coalition's copies, after an attack) judged the way
        the attack grid judges it (:func:`securemark.evaluation.grid.evaluate`): accuracy on
        ``test``, BER and the verdicts through both channels, its weights and, with the
        black-box fingerprint on, its answers to the keys. ``colluders``: the issued
        customers whose copies went into it."""
        from securemark.evaluation.grid import evaluate

        cfg = cfg or self.config.trace
        api = self.api_probe() if self.config.blackbox.enabled else None  # the label-only channel
        return evaluate(model, colluders, self.codebook, self.issued_codewords(), self.extractor(), codebook_indices(self.codebook), test,
                        cfg.epsilon, cfg.scorer, cfg.decoder, api)


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _client_features(base: SplitNet, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([base.client(images[i : i + batch]) for i in range(0, len(images), batch)])


def _blackbox_book(bb: BlackboxConfig, capacity: int, secret: bytes) -> SymbolBook:
    """The black-box words a vendor with ``secret`` draws (its own, or a null secret's)."""
    return SymbolBook.generate(capacity, bb.symbols, derive_seed(secret, "blackbox-codebook"), bb.q, bb.prior)


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
