"""Tracing: from a suspicious model to a verdict.

- :mod:`~securemark.tracing.extractor`: soft values ``y`` read out of a suspect after
  re-aligning it to the base model;
- :mod:`~securemark.tracing.decoders`: scoring every code word against ``y`` and
  accusing at a whole-trace false-accusation probability (a registry of decoders);
- :mod:`~securemark.tracing.drift`: the drift-whitened reading (where leakers' updates
  move the readout least), decided beside the plain one with epsilon split;
- :mod:`~securemark.tracing.tamper`: obfuscation where data does not look, detected (a
  trace that accuses no one is then inconclusive).
"""

import numpy as np

from securemark.codes import Codebook
from securemark.tracing.decoders import (
    BOUND_DESCRIPTION,
    Candidate,
    Verdict,
    available_decoders,
    create_decoder,
    decide,
    decide_peeling,
    decide_readings,
    register_decoder,
)
from securemark.tracing.drift import DriftModel, fit_drift
from securemark.tracing.extractor import Extractor
from securemark.tracing.tamper import OFF_DATA_NOTE, off_data_basis, off_data_energy


def codebook_indices(codebook: Codebook) -> np.ndarray:
    """Code words scored in a trace: the whole codebook (its capacity), not only the
    words issued so far, so the union bound covers every customer the ledger can hold
    and a trace's threshold does not move as customers are added."""
    return np.arange(len(codebook), dtype=np.int64)


__all__ = [
    "BOUND_DESCRIPTION",
    "OFF_DATA_NOTE",
    "off_data_basis",
    "off_data_energy",
    "Candidate",
    "Verdict",
    "Extractor",
    "available_decoders",
    "codebook_indices",
    "create_decoder",
    "decide",
    "decide_peeling",
    "decide_readings",
    "DriftModel",
    "fit_drift",
    "register_decoder",
]


def probe_outputs(model, probe):
    """The suspect's outputs on the vendor's probe images (eval mode, no gradients)."""
    import torch

    with torch.no_grad():
        return model.eval()(probe)


def suspect_outputs_finite(model, probe, outputs=None) -> bool:
    """Whether the suspect computes finite outputs on the vendor's probe images (a model
    whose weights overflow computes NaN or Inf and cannot be read or aligned).
    ``outputs``: :func:`probe_outputs` when the caller already has them."""
    import torch

    return bool(torch.isfinite(probe_outputs(model, probe) if outputs is None else outputs).all())


def degeneracy(model, probe, layer: str, outputs=None) -> str:
    """What makes a (well-formed) suspect degenerate, in words; empty when nothing does.
    ``outputs``: :func:`probe_outputs` when the caller already has them.

    A degenerate model is still a model: the trace says what it can and cannot conclude
    instead of failing."""
    import torch

    from securemark.fingerprint import effective_weight

    notes = []
    outputs = probe_outputs(model, probe) if outputs is None else outputs
    if not suspect_outputs_finite(model, probe, outputs):
        notes.append("the model computes NaN or Inf on ordinary images (its weights overflow): nothing can be read from it, "
                     "and it is useless as a classifier")
    else:
        if float(outputs.std(0).max()) == 0.0:
            notes.append("the model gives the same output for every image: it does not classify, whatever it carries")
    with torch.no_grad():
        weight = effective_weight(model, layer)
    if torch.isfinite(weight).all() and float(weight.abs().max()) == 0.0:
        notes.append(f"the fingerprinted layer ({layer}) is all zeros: it carries no code word, so no one is accused on its account")
    return " ".join(notes)


def no_verdict(cfg, indices: np.ndarray, note: str) -> Verdict:
    """The verdict when nothing could be read: no one accused, and why."""
    import math

    return Verdict(cfg.scorer, cfg.epsilon, math.inf, len(indices), [], [], np.zeros(len(indices)), note)
