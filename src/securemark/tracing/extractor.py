"""Reading soft values out of a suspicious model: re-align it to the base model, then
project the readout of the fingerprinted layer with the key.

The extractor depends only on the suspect, the vendor's base model, the probe images
and the key matrix it is given -- never on a code word -- so an innocent customer's
word stays independent of the extracted ``y`` and the distribution-free threshold of
:mod:`securemark.scoring` holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from securemark.alignment import Aligner, ProbePass, probe_pass
from securemark.fingerprint import Readout, effective_weight, extract
from securemark.model import ModelSpec, SplitNet, fold_batchnorm
from securemark.tracing.drift import DriftModel
from securemark.tracing.tamper import off_data_basis, off_data_energy

__all__ = ["Extractor"]


@dataclass(frozen=True, eq=False)
class Extractor:
    """Soft values ``y = K phi`` of a suspect, read after aligning it to the base model.

    Attributes:
        spec: the architecture suspects are rebuilt with.
        readout: what the key projects (:class:`~securemark.fingerprint.Readout`, built
            from the base model and the vendor's probe images).
        key_matrix: the vendor's key ``K`` [code_length, readout size].
        reference: the vendor's base model (what suspects are aligned to).
        probe: float [N, 1, 28, 28], a fixed batch of the vendor's ``aux`` images.
        align: False reads the weights as they are (batch norms folded, no re-alignment).
        drift: the vendor's drift model (:mod:`~securemark.tracing.drift`): with it, a
            suspect is also read drift-whitened (:meth:`readings`).
        off_data_limit: a suspect whose :meth:`off_data_ratio` exceeds it, and whose
            :meth:`readout_change` stays within ``derived_limit``, is reported as obfuscated
            where data does not look (:mod:`~securemark.tracing.tamper`); 0: no check.
        derived_limit: the readout change up to which a suspect counts as an update of the
            base model (copies 0.2, fine-tuned coalitions 0.3-0.45, independently trained
            models ~1.0).
        prepared_aligner: the reference side of alignment already computed for
            ``reference`` and ``probe`` (None: computed on first use).
    """

    spec: ModelSpec
    readout: Readout
    key_matrix: torch.Tensor
    reference: SplitNet
    probe: torch.Tensor
    align: bool = True
    drift: DriftModel | None = None
    off_data_limit: float = 0.0
    derived_limit: float = 0.75
    prepared_aligner: Aligner | None = None

    @property
    def layer(self) -> str:
        return self.readout.layer

    @cached_property
    def aligner(self) -> Aligner:
        """The reference side of alignment, computed once for every suspect (or the one
        given as ``prepared_aligner``, e.g. loaded from the vendor's state)."""
        return self.prepared_aligner or Aligner(self.reference, self.probe)

    def model(self, state_or_model) -> SplitNet:
        if isinstance(state_or_model, SplitNet):
            return state_or_model
        model = SplitNet(self.spec)
        model.load_state_dict(state_or_model)
        return model

    def probe_pass(self, state_or_model) -> ProbePass:
        """The suspect folded and run once on the probe images: its outputs (a trace's
        checks) and its activations (alignment), for :meth:`aligned`."""
        return probe_pass(self.model(state_or_model), self.probe)

    def aligned(self, state_or_model) -> tuple[SplitNet, dict]:
        """The suspect aligned to the base model (batch norms folded), and the alignment
        summary (empty when alignment is off). ``state_or_model`` may be the suspect's
        :meth:`probe_pass` (which it consumes)."""
        suspect = state_or_model if isinstance(state_or_model, ProbePass) else self.model(state_or_model)
        if not self.align:
            return (suspect.model if isinstance(suspect, ProbePass) else fold_batchnorm(suspect)), {}
        result = self.aligner.align(suspect)
        return result.model, result.summary()

    def __call__(self, state_or_model, key_matrix: torch.Tensor | None = None) -> tuple[np.ndarray, dict]:
        """``(y, alignment summary)`` under the vendor's key (or ``key_matrix``)."""
        model, summary = self.aligned(state_or_model)
        return self.project(model, key_matrix), summary

    def project(self, aligned_model: SplitNet, key_matrix: torch.Tensor | None = None) -> np.ndarray:
        """``y`` of an already aligned model under the key (or ``key_matrix``)."""
        return extract(aligned_model, self.readout, self.key_matrix if key_matrix is None else key_matrix).numpy()

    def readings(self, aligned_model: SplitNet, key_matrix: torch.Tensor | None = None) -> dict[str, np.ndarray]:
        """Every reading of an aligned model a trace decides on: ``plain`` (``y = K phi``)
        and, with a drift model, ``drift`` (``y = K whiten(phi)``)."""
        if self.drift is None:
            return {"plain": self.project(aligned_model, key_matrix)}
        ys = extract(aligned_model, self.readout, self.key_matrix if key_matrix is None else key_matrix, self.drift.whiten)
        return {name: y.numpy() for name, y in ys.items()}

    @cached_property
    def _off_data(self) -> tuple[torch.Tensor, float] | None:
        """The readout's excited directions and the base model's off-data energy."""
        if self.readout.metric is None:
            return None
        basis = off_data_basis(self.readout.metric)
        with torch.no_grad():
            return basis, off_data_energy(effective_weight(self.reference, self.layer), basis)

    def off_data_ratio(self, aligned_model: SplitNet) -> float:
        """The suspect's share of carrying-layer weight energy outside the directions the
        vendor's data excites, as a multiple of the base model's (NaN for a weights readout)."""
        if self._off_data is None:
            return float("nan")
        basis, base = self._off_data
        with torch.no_grad():
            return off_data_energy(effective_weight(aligned_model, self.layer), basis) / base

    def readout_change(self, aligned_model: SplitNet) -> float:
        """How far the suspect's readout moved from the base model's, relative to the
        base's (``||phi|| / ||origin||``: small for copies and their updates, large for a
        model trained independently)."""
        with torch.no_grad():
            phi = self.readout.features(aligned_model).detach().to(torch.float64)
        return float(phi.norm() / self.readout.origin.to(torch.float64).norm().clamp_min(1e-30))

    def obfuscated(self, aligned_model: SplitNet) -> bool:
        """Whether the check is on and the suspect is an obfuscated update of the base
        model: its off-data energy above ``off_data_limit`` while what the data excites
        stayed within ``derived_limit`` of the base's readout (a model trained
        independently has both high: it is no one's copy, and is not flagged)."""
        return (self.off_data_limit > 0 and self.off_data_ratio(aligned_model) > self.off_data_limit
                and self.readout_change(aligned_model) <= self.derived_limit)

    def raw(self, state_or_model) -> np.ndarray:
        """``y`` of the weights as they are, not re-aligned (what an extractor without
        alignment reads)."""
        return extract(self.model(state_or_model), self.readout, self.key_matrix).numpy()
