"""Tracing: from a suspicious model to a verdict.

- :mod:`~securemark.tracing.extractor`: soft values ``y`` read out of a suspect after
  re-aligning it to the base model;
- :mod:`~securemark.tracing.decoders`: scoring every code word against ``y`` and
  accusing at a whole-trace false-accusation probability (a registry of decoders).
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
    register_decoder,
)
from securemark.tracing.extractor import Extractor


def codebook_indices(codebook: Codebook) -> np.ndarray:
    """Code words scored in a trace: the whole codebook (its capacity), not only the
    words issued so far, so the union bound covers every customer the ledger can hold
    and a trace's threshold does not move as customers are added."""
    return np.arange(len(codebook), dtype=np.int64)


__all__ = [
    "BOUND_DESCRIPTION",
    "Candidate",
    "Verdict",
    "Extractor",
    "available_decoders",
    "codebook_indices",
    "create_decoder",
    "decide",
    "decide_peeling",
    "register_decoder",
]
