"""Tracing: from soft values extracted out of a suspicious model to a verdict.

Every customer in the ledger is scored against ``y`` (vectorised over the bit-packed
codebook), the threshold is set from the whole-trace false-accusation probability
``epsilon`` with a Chernoff bound that holds for any ``y`` (see
:mod:`securemark.scoring`), and customers at or above it are accused, each with an upper
bound on its p-value.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from securemark.codes import Codebook
from securemark.scoring import create_scorer, p_values, score_all, threshold

BOUND_DESCRIPTION = (
    "Chernoff bound with the exact per-symbol moment generating function of an innocent "
    "customer's code word (independent bits with the codebook's biases), valid for any "
    "extracted values y; union bound over all customers in the ledger."
)


@dataclass(frozen=True)
class Candidate:
    codeword_index: int
    score: float
    p_value: float      # bound on P(an innocent scores this high)
    family_p: float     # bound on P(any of the n customers' innocents scores this high)


@dataclass(frozen=True)
class Verdict:
    scorer: str
    epsilon: float
    threshold: float
    n_customers: int
    accused: list[Candidate] = field(default_factory=list)
    top_others: list[Candidate] = field(default_factory=list)  # highest non-accused scores
    scores: np.ndarray | None = None  # all ledger customers' scores (same order as indices)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("scores")
        return d


def decide(
    y: np.ndarray,
    codebook: Codebook,
    indices: np.ndarray,
    epsilon: float = 1e-6,
    scorer: str = "correlation",
    top: int = 5,
) -> Verdict:
    """Score the customers holding code words ``indices`` against ``y`` and accuse.

    ``epsilon`` is the probability, over the innocents' code words, that the trace
    accuses at least one innocent customer (all ``len(indices)`` of them together).
    """
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size == 0:
        raise ValueError("the ledger holds no customers to trace against")
    w = create_scorer(scorer).weights(np.asarray(y, dtype=np.float64))
    all_scores = score_all(codebook, w)[indices]
    thr = threshold(w, codebook.biases, epsilon, len(indices))
    order = np.argsort(-all_scores)
    shown = order[: max(top, int((all_scores >= thr).sum()) + top)]
    per, fam = p_values(all_scores[shown], w, codebook.biases, len(indices))
    candidates = [Candidate(int(indices[j]), float(all_scores[j]), float(p), float(f)) for j, p, f in zip(shown, per, fam)]
    accused = [c for c in candidates if c.score >= thr]
    others = [c for c in candidates if c.score < thr][:top]
    return Verdict(scorer, epsilon, float(thr), len(indices), accused, others, all_scores)
