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
from securemark.registry import Registry
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


_DECODERS: Registry = Registry("decoder", tag=None)
# function decorator: register a decoder ``(y, codebook, indices, epsilon, scorer) -> Verdict``
register_decoder = _DECODERS.register
create_decoder = _DECODERS.get
available_decoders = _DECODERS.names


@register_decoder("plain")
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


@register_decoder("peeling")
def decide_peeling(
    y: np.ndarray,
    codebook: Codebook,
    indices: np.ndarray,
    epsilon: float = 1e-6,
    scorer: str = "correlation",
    max_accused: int = 32,
    top: int = 5,
) -> Verdict:
    """Successive-cancellation ("peeling") decoder for large coalitions.

    Accuse the strongest customer if it clears the threshold, remove its expected
    contribution from ``y`` (least-squares fit of its centred code word), re-score, and
    repeat while the next score clears the threshold. The first step spends
    ``epsilon / 2`` (so it accuses nearly whenever the plain decoder would), each of the
    at most ``max_accused - 1`` later steps ``epsilon / (2 (max_accused - 1))``. While
    every accused customer is guilty, the residual depends only on ``y`` and colluders'
    words, so innocents' words stay independent of it and each step's bound holds: by
    the union bound the whole trace accuses an innocent with probability <= ``epsilon``.
    """
    indices = np.asarray(indices, dtype=np.int64)
    residual = np.asarray(y, dtype=np.float64).copy()
    p = codebook.biases
    if max_accused < 2:
        raise ValueError("max_accused must be >= 2 for peeling; use decide() otherwise")
    budgets = [epsilon / 2] + [epsilon / (2 * (max_accused - 1))] * (max_accused - 1)
    accused: list[Candidate] = []
    taken: set[int] = set()
    scores = thr = None
    for step_eps in budgets:
        w = create_scorer(scorer).weights(residual)
        scores = score_all(codebook, w)[indices]
        thr = threshold(w, p, step_eps, len(indices))
        order = [j for j in np.argsort(-scores) if int(indices[j]) not in taken]
        best = order[0]
        if scores[best] < thr:
            break
        per, fam = p_values(scores[[best]], w, p, len(indices))
        index = int(indices[best])
        accused.append(Candidate(index, float(scores[best]), float(per[0]), float(min(1.0, fam[0] * epsilon / step_eps))))
        taken.add(index)
        u = (codebook.word(index).astype(np.float64) - p) / np.sqrt(p * (1 - p))
        residual = residual - (residual @ u) / (u @ u) * u
        if not np.any(residual):
            break
    order = [j for j in np.argsort(-scores) if int(indices[j]) not in taken][:top]
    per, fam = p_values(scores[order], create_scorer(scorer).weights(residual), p, len(indices))
    others = [Candidate(int(indices[j]), float(scores[j]), float(a), float(b)) for j, a, b in zip(order, per, fam)]
    return Verdict(f"{scorer}+peeling", epsilon, float(thr), len(indices), accused, others, scores)
