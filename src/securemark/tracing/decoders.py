"""Tracing: from soft values extracted out of a suspicious model to a verdict.

Every customer in the ledger is scored against ``y`` (vectorised over the bit-packed
codebook), the threshold is set from the whole-trace false-accusation probability
``epsilon`` with a Chernoff bound that holds for any ``y`` (see
:mod:`securemark.scoring`), and customers at or above it are accused, each with an upper
bound on its p-value.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from securemark.codes import Codebook
from securemark.errors import InvalidConfig, InvalidInput
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
    note: str = ""  # what the trace could not conclude, when something stood in its way
    readings: dict[str, int] = field(default_factory=dict)  # reading -> customers it accused (empty: one reading)
    shown: str = ""  # the reading whose threshold and scores this verdict shows

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("scores")
        return d


_DECODERS: Registry = Registry("decoder", tag=None)
# function decorator: register a decoder ``(y, codebook, indices, epsilon, scorer) -> Verdict``
register_decoder = _DECODERS.register
create_decoder = _DECODERS.get
available_decoders = _DECODERS.names


NO_SIGNAL = ("the model reads exactly like the vendor's base model (y = 0): it carries no code word, so no one "
             "can be accused; either it is the base model itself or whatever carried a mark was reset to the base")


def _no_signal(y: np.ndarray, scorer: str, epsilon: float, indices: np.ndarray, top: int) -> Verdict | None:
    """The verdict when ``y`` carries no signal at all (every value zero): no one accused,
    and a note saying why; None when there is something to score."""
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 1 or y.size == 0 or not np.all(np.isfinite(y)) or np.any(y != 0):
        return None  # scored as usual (the scorer refuses malformed input with a clear message)
    others = [Candidate(int(i), 0.0, 1.0, 1.0) for i in indices[:top]]
    return Verdict(scorer, epsilon, math.inf, len(indices), [], others, np.zeros(len(indices)), NO_SIGNAL)


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
        raise InvalidInput("the ledger holds no customers to trace against")
    silent = _no_signal(y, scorer, epsilon, indices, top)
    if silent is not None:
        return silent
    w = create_scorer(scorer).weights(np.asarray(y, dtype=np.float64))
    all_scores = score_all(codebook, w, indices)
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
    max_steps: int = 8,
    first_share: float = 0.8,
    top: int = 5,
) -> Verdict:
    """Successive-cancellation ("peeling") decoder for large coalitions.

    Step 1 accuses every customer whose score clears the threshold for
    ``first_share * epsilon`` (the plain decoder, at a slightly smaller epsilon). Then
    ``y`` is projected off the span of all accused customers' centred code words (one
    least-squares fit, so the colluders' shares of ``y`` are estimated jointly), the
    others are re-scored, and everyone above the next threshold is accused; repeat while
    someone new clears it, for at most ``max_steps`` steps. The later steps share the
    rest of ``epsilon`` equally.

    Why no innocent is accused with probability above ``epsilon``: consider the run that
    only ever accuses colluders (same thresholds). Its residuals depend only on ``y`` and
    colluders' words, so an innocent's word is independent of each of them, and each
    step's bound holds for it. The actual run departs from that one only at the first
    step where an innocent clears the threshold; summing the steps' budgets bounds that.
    """
    indices = np.asarray(indices, dtype=np.int64)
    silent = _no_signal(y, f"{scorer}+peeling", epsilon, indices, top)
    if silent is not None:
        return silent
    y = np.asarray(y, dtype=np.float64)
    residual = y.copy()
    p = codebook.biases
    if max_steps < 2:
        raise InvalidConfig(f"decoder 'peeling': max_steps must be >= 2 (use the plain decoder otherwise), got {max_steps}")
    if not 0.0 < first_share < 1.0:
        raise InvalidConfig(f"decoder 'peeling': first_share must be in (0, 1), got {first_share}")
    budgets = [epsilon * first_share] + [epsilon * (1.0 - first_share) / (max_steps - 1)] * (max_steps - 1)
    accused: list[Candidate] = []
    taken: list[int] = []
    scores = thr = None
    for step_eps in budgets:
        w = create_scorer(scorer).weights(residual)
        scores = score_all(codebook, w, indices)
        thr = threshold(w, p, step_eps, len(indices))
        new = [j for j in np.argsort(-scores) if scores[j] >= thr and int(indices[j]) not in taken]
        if not new:
            break
        per, fam = p_values(scores[new], w, p, len(indices))
        for j, a, b in zip(new, per, fam):
            accused.append(Candidate(int(indices[j]), float(scores[j]), float(a), float(min(1.0, b * epsilon / step_eps))))
            taken.append(int(indices[j]))
        words = codebook.words(np.asarray(taken)).astype(np.float64)
        U = ((words - p) / np.sqrt(p * (1 - p))).T  # [m, accused], centred symbols
        coef, *_ = np.linalg.lstsq(U, y, rcond=None)
        residual = y - U @ coef
        if not np.any(np.abs(residual) > 1e-12 * max(1.0, np.abs(y).max())):
            break
    order = [j for j in np.argsort(-scores) if int(indices[j]) not in taken][:top]
    per, fam = p_values(scores[order], create_scorer(scorer).weights(residual), p, len(indices))
    others = [Candidate(int(indices[j]), float(scores[j]), float(a), float(b)) for j, a, b in zip(order, per, fam)]
    return Verdict(f"{scorer}+peeling", epsilon, float(thr), len(indices), accused, others, scores)


def decide_readings(
    readings: dict[str, np.ndarray],
    codebook: Codebook,
    indices: np.ndarray,
    epsilon: float = 1e-6,
    scorer: str = "correlation",
    decoder: str = "peeling",
) -> Verdict:
    """Decide on several readings of one suspect (e.g. ``plain`` and ``drift``), each with
    the decoder at ``epsilon / len(readings)``; a customer is accused when any reading
    accuses it.

    Why the bound holds: each reading depends only on the suspect and the vendor's own data
    and key, never on an innocent's code word, so each decision accuses an innocent with
    probability at most its share; the union bound adds the shares up to ``epsilon``.
    Reported per customer: the best p-value over the readings, and a family p-value scaled
    by the number of readings. The verdict's threshold and scores are those of the reading
    whose best score stands highest above its own threshold (``shown`` names it).
    """
    if not readings:
        raise InvalidInput("no reading of the suspect to decide on")
    share = epsilon / len(readings)
    verdicts = {name: create_decoder(decoder)(y, codebook, indices, share, scorer) for name, y in readings.items()}
    if len(verdicts) == 1:
        (name, verdict), = verdicts.items()
        return replace(verdict, epsilon=epsilon)

    def strength(v: Verdict) -> float:
        if v.scores is None or not math.isfinite(v.threshold) or v.threshold <= 0:
            return -math.inf
        return float(np.max(v.scores)) / v.threshold

    lead_name, lead = max(verdicts.items(), key=lambda item: strength(item[1]))
    accused: dict[int, Candidate] = {}
    for v in verdicts.values():
        for c in v.accused:
            scaled = Candidate(c.codeword_index, c.score, c.p_value, min(1.0, c.family_p * len(verdicts)))
            best = accused.get(c.codeword_index)
            if best is None or scaled.p_value < best.p_value:
                accused[c.codeword_index] = scaled
    ordered = sorted(accused.values(), key=lambda c: c.p_value)
    others = [c for c in lead.top_others if c.codeword_index not in accused]
    note = " ".join(dict.fromkeys(v.note for v in verdicts.values() if v.note))
    return Verdict(lead.scorer, epsilon, lead.threshold, lead.n_customers, ordered, others, lead.scores, note,
                   {name: len(v.accused) for name, v in verdicts.items()}, lead_name)
