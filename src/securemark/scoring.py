"""Score every customer against an extracted fingerprint, with a provable threshold.

Tracing reads soft values ``y`` (float [m], one per code bit) out of a suspicious
model. A *scorer* (registered by name, ``create_scorer(name)``) turns ``y`` into unit
weights ``w`` (``||w||_2 = 1``), and customer j's score is

    S_j = sum_i u_ji * w_i,    u_ji = (b_ji - p_i) / sqrt(p_i (1 - p_i)),

with ``b_ji`` customer j's bit and ``p_i`` the code book's bias. The symbols ``u_ji``
are centred and have unit variance, so for an *innocent* customer -- one whose code
word is independent of ``y`` -- ``E[S_j] = 0`` and ``Var[S_j] = 1`` whatever ``y`` is.

The false-accusation threshold comes from a Chernoff bound on ``P(S_j >= z)`` that uses
only the randomness of the innocent's code word (independent bits with biases ``p``),
so it holds for *any* weights, adversarially chosen ones included, and a union bound
over all customers makes it a family-wise guarantee. It requires independent
positions (``tardos``, ``random`` code books); for ``bibd`` it is a heuristic.

Everything is vectorised: :func:`score_all` scores a million bit-packed code words
through per-byte lookup tables, with no Python loop over customers.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np

from securemark import checks
from securemark.codes import Codebook
from securemark.errors import InvalidInput
from securemark.registry import Registry

logger = logging.getLogger(__name__)

__all__ = [
    "Scorer",
    "CorrelationScorer",
    "TardosScorer",
    "register_scorer",
    "create_scorer",
    "available_scorers",
    "centred_symbols",
    "score_all",
    "score_dense",
    "log_tail_bound",
    "threshold",
    "p_values",
]

# Rows scored per chunk (one thread's share of a large codebook).
_CHUNK_ROWS = 16_384
# Bits of a byte value, little-endian: _BYTE_BITS[v, b] = (v >> b) & 1.
_BYTE_BITS = ((np.arange(256)[:, None] >> np.arange(8)[None, :]) & 1).astype(np.float64)
# Grid of Chernoff parameters used to bound many scores at once in p_values.
_LAMBDA_GRID = 129


# --------------------------------------------------------------------------- scorers


class Scorer(Protocol):
    """Maps extracted soft values y (float [m]) to unit weights w (float64 [m])."""

    def weights(self, y: np.ndarray) -> np.ndarray:
        ...


_SCORERS: Registry[type] = Registry("scorer")
register_scorer = _SCORERS.register  # class decorator: make a scorer available as create_scorer(name)
available_scorers = _SCORERS.names  # names of the registered scorers, sorted


def create_scorer(name: str) -> Scorer:
    """The scorer registered as ``name``; UnknownName listing the valid names otherwise."""
    return _SCORERS.get(name)()


def _check_soft_values(y: np.ndarray) -> np.ndarray:
    """y as float64 [m]; untrusted input, so fail loudly on wrong shape or non-finite values."""
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 1 or y.size == 0:
        raise InvalidInput(f"y: need a non-empty 1-D array of soft values, got shape {y.shape}")
    if not np.all(np.isfinite(y)):
        raise InvalidInput("y: contains NaN or infinite values")
    return y


def _unit(v: np.ndarray, what: str) -> np.ndarray:
    norm = float(np.linalg.norm(v))
    if norm == 0.0:
        raise InvalidInput(f"y: {what} is all zeros; there is no fingerprint to score")
    return v / norm


def _expit(x: np.ndarray) -> np.ndarray:
    """The logistic function ``1 / (1 + exp(-x))``, stable for any ``x`` (scipy.special.expit
    without importing scipy.special, which costs ~0.25 s on the command line)."""
    return np.exp(-np.logaddexp(0.0, -x))


@register_scorer("correlation")
class CorrelationScorer:
    """``w = y / ||y||``: keeps the soft values, so averaged copies (whose projections
    shrink towards zero where colluders disagree) weigh agreed positions more."""

    def weights(self, y: np.ndarray) -> np.ndarray:
        return _unit(_check_soft_values(y), "y")


@register_scorer("tardos")
class TardosScorer:
    """``w = sign(y) / sqrt(m)``: hard decisions, which makes S_j exactly the symmetric
    Tardos accusation score divided by sqrt(m). Positions with ``y_i == 0`` (no
    decision) get weight 0 and the rest are rescaled to keep ``||w|| = 1``."""

    def weights(self, y: np.ndarray) -> np.ndarray:
        return _unit(np.sign(_check_soft_values(y)), "sign(y)")


# --------------------------------------------------------------------------- scores


def _check_weights(w: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w = np.asarray(w, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    if w.ndim != 1 or w.shape != p.shape:
        raise InvalidInput(f"w: need shape {p.shape} to match the biases, got {w.shape}")
    if not np.all(np.isfinite(w)):
        raise InvalidInput("w: contains NaN or infinite values")
    if not np.all((p > 0.0) & (p < 1.0)):
        raise InvalidInput("p: every bias must lie strictly between 0 and 1")
    return w, p


def centred_symbols(bits: np.ndarray, p: np.ndarray) -> np.ndarray:
    """``u = (b - p) / sqrt(p (1 - p))`` for 0/1 ``bits`` [..., m]: mean 0, variance 1."""
    p = np.asarray(p, dtype=np.float64)
    return (np.asarray(bits, dtype=np.float64) - p) / np.sqrt(p * (1.0 - p))


def score_dense(bits: np.ndarray, w: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Reference scores of unpacked words ``bits`` [n, m]: ``centred_symbols(bits, p) @ w``."""
    w, p = _check_weights(w, p)
    return centred_symbols(bits, p) @ w


def score_all(codebook: Codebook, w: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Scores ``S_j`` of every customer in ``codebook`` (or of the code words ``rows``) for unit weights ``w``.

    ``S = B a + c`` with ``a_i = w_i / sqrt(p_i (1 - p_i))`` and ``c = -sum_i p_i a_i``.
    ``B a`` is read straight from the packed bytes: ``tables[k, v]`` is the sum of ``a``
    over the bits set in byte value ``v`` at byte position ``k``, so a customer's
    ``B a`` is the sum of ``ceil(m / 8)`` table entries, added up one byte position at a
    time over a chunk of rows (small buffers that stay in the cache: a whole-codebook
    gather index is 20 MB of fresh memory per call, 50-170 ms the first calls of a
    process against 10 ms); chunks of rows run on a few threads.

    Returns:
        float64 [n], in customer (row) order; with ``rows``, float64 [len(rows)] in that order.
    """
    w, p = _check_weights(w, codebook.biases)
    a = w / np.sqrt(p * (1.0 - p))
    offset = -float(np.dot(p, a))
    n_bytes = codebook.n_bytes
    a_padded = np.zeros(n_bytes * 8)
    a_padded[: a.size] = a  # padding bits contribute nothing, whatever their value
    tables = np.ascontiguousarray((_BYTE_BITS @ a_padded.reshape(n_bytes, 8).T).T)  # [n_bytes, 256]
    packed = codebook.packed if rows is None else codebook.packed[np.asarray(rows, dtype=np.intp)]
    n = packed.shape[0]
    scores = np.empty(n, dtype=np.float64)

    def score_chunk(start: int) -> None:
        columns = packed[start : start + _CHUNK_ROWS].T  # [n_bytes, rows]: byte k of every word in the chunk
        total = np.zeros(columns.shape[1])
        for k in range(n_bytes):
            total += tables[k].take(columns[k])
        scores[start : start + columns.shape[1]] = total

    starts = range(0, n, _CHUNK_ROWS)
    workers = max(1, min(4, os.cpu_count() or 1, len(starts)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(score_chunk, starts))
    scores += offset
    return scores


# --------------------------------------------------------------------------- Chernoff bound


def _increasing_root(f: Callable[[float], float], derivative: Callable[[float], float]) -> float:
    """The root on lam > 0 of ``f``, increasing with ``f(0) < 0``: a bracket doubled from
    [0, 1] until ``f`` turns non-negative (1e12 when it never does), then Newton's method
    kept inside the bracket, which shrinks at every step (bisection where Newton would leave
    it or ``derivative`` is 0), to 1e-12 relative."""
    lo, hi = 0.0, 1.0
    while f(hi) < 0.0:
        lo, hi = hi, 2.0 * hi
        if hi > 1e12:
            return hi
    lam = 0.5 * (lo + hi)
    for _ in range(200):
        gap = f(lam)
        if gap == 0.0:
            return lam
        lo, hi = (lo, lam) if gap > 0.0 else (lam, hi)
        slope = derivative(lam)
        step = lam - gap / slope if slope > 0.0 else math.nan
        if not lo < step < hi:
            step = 0.5 * (lo + hi)
        if abs(step - lam) <= 1e-12 * (1.0 + abs(lam)):
            return step
        lam = step
    return lam


class _Cumulant:
    """Log moment generating function of an innocent's score, ``K(lam) = log E[exp(lam S)]``.

    With ``S = sum_i w_i u_i`` and independent two-valued ``u_i``:
    ``K(lam) = sum_i log(p_i exp(lam w_i u+_i) + (1 - p_i) exp(lam w_i u-_i))``,
    ``u+_i = sqrt((1 - p_i) / p_i)``, ``u-_i = -sqrt(p_i / (1 - p_i))``. K is convex,
    ``K(0) = 0``, ``K'(0) = E[S] = 0``, and ``K'(lam)`` increases to ``s_max``, the
    largest score an innocent can reach.
    """

    def __init__(self, w: np.ndarray, p: np.ndarray) -> None:
        w, p = _check_weights(w, p)
        self.hi = w * np.sqrt((1.0 - p) / p)  # contribution when b_i = 1
        self.lo = -w * np.sqrt(p / (1.0 - p))  # contribution when b_i = 0
        self.log_p = np.log(p)
        self.log_q = np.log1p(-p)
        self.logit = self.log_p - self.log_q
        top = np.maximum(self.hi, self.lo)
        self.s_max = float(top.sum())
        # log P(S = s_max): every position takes its larger value (ties take either).
        log_top = np.where(self.hi > self.lo, self.log_p, np.where(self.hi < self.lo, self.log_q, 0.0))
        self.log_p_max = float(log_top.sum())
        # Scores computed elsewhere (other summation order) can exceed s_max by
        # rounding; within this tolerance a score counts as s_max, never as impossible.
        self.tol = 1e-9 * float(np.abs(self.hi).sum() + np.abs(self.lo).sum())

    def value(self, lam: np.ndarray | float) -> np.ndarray:
        """K(lam) for scalar or 1-D lam (stable: logaddexp)."""
        lam = np.asarray(lam, dtype=np.float64)[..., None]
        return np.logaddexp(self.log_p + lam * self.hi, self.log_q + lam * self.lo).sum(axis=-1)

    def slope(self, lam: float) -> float:
        """K'(lam): the mean of S under the exponentially tilted distribution."""
        tilted_p = _expit(self.logit + lam * (self.hi - self.lo))
        return float(np.dot(tilted_p, self.hi) + np.dot(1.0 - tilted_p, self.lo))

    def curvature(self, lam: float) -> float:
        """K''(lam): the variance of S under the exponentially tilted distribution (> 0)."""
        tilted_p = _expit(self.logit + lam * (self.hi - self.lo))
        return float(np.dot(tilted_p * (1.0 - tilted_p), (self.hi - self.lo) ** 2))

    def best_lambda(self, z: float) -> float:
        """The lam >= 0 minimising ``K(lam) - lam z`` for ``0 < z < s_max``: the root of the
        increasing ``K'(lam) - z`` (:func:`_increasing_root`). Any lam >= 0 gives a valid
        bound, so the root's precision only decides how tight the bound is. Past 1e12, z is
        within rounding of s_max and the bound is its limit."""
        if self.slope(0.0) >= z:  # z within rounding of E[S] = 0
            return 0.0
        return _increasing_root(lambda lam: self.slope(lam) - z, self.curvature)

    def threshold_lambda(self, target: float) -> float:
        """The lam > 0 minimising ``(K(lam) - target) / lam`` for ``log_p_max < target < 0``:
        the root of ``h(lam) = lam K'(lam) - K(lam) + target``, which increases from
        ``target < 0`` (h' = lam K'' > 0) towards ``target - log_p_max > 0``
        (:func:`_increasing_root`; past 1e12 the threshold is within rounding of s_max)."""
        return _increasing_root(lambda lam: lam * self.slope(lam) - float(self.value(lam)) + target,
                                lambda lam: lam * self.curvature(lam))

    def log_bound(self, z: float) -> float:
        """``min_{lam >= 0} K(lam) - lam z``: Chernoff bound on log P(S >= z)."""
        if z <= 0.0:
            return 0.0
        if z > self.s_max + self.tol:
            return -math.inf
        if z >= self.s_max - self.tol:
            return self.log_p_max
        lam = self.best_lambda(z)
        return min(0.0, float(self.value(lam)) - lam * z)


def log_tail_bound(w: np.ndarray, p: np.ndarray, z: float) -> float:
    """Chernoff bound on ``log P(S >= z)`` for an innocent customer.

    ``log P(S >= z) <= min_{lam >= 0} sum_i log(p_i e^{lam w_i u+_i} + (1 - p_i)
    e^{lam w_i u-_i}) - lam z``. Only the innocent's code word is random (independent
    bits, ``P(b_i = 1) = p_i``); ``w`` is any fixed vector, so the bound holds for any
    ``y`` the suspicious model yields, adversarial ones included.

    Returns:
        The bound in natural log (<= 0); ``-inf`` when ``z`` exceeds every reachable score.
    """
    return _Cumulant(w, p).log_bound(float(z))


def _check_eps_n(epsilon: float, n_customers: int) -> None:
    checks.number("trace", "epsilon", epsilon, 0.0, 1.0, low_open=True, high_open=True)
    checks.integer("trace", "n_customers", n_customers, 1)


def threshold(w: np.ndarray, p: np.ndarray, epsilon: float, n_customers: int) -> float:
    """Smallest z with ``n_customers * P_bound(S >= z) <= epsilon``.

    Accusing every customer with ``S_j >= z`` then accuses an innocent with
    probability at most ``epsilon`` (union bound over the ledger). With ``t`` the target
    log-probability, any ``lam > 0`` gives a valid threshold ``z(lam) = (K(lam) - t) / lam``
    (Chernoff: ``log P(S >= z) <= K(lam) - lam z = t``), so the solver's precision only
    decides how tight it is; the smallest is at the root of ``lam K'(lam) - K(lam) + t``
    (increasing in lam), found as in :meth:`_Cumulant.best_lambda`. ``inf`` when no
    reachable score is rare enough (code too short or weights too concentrated for this
    epsilon): then no one is accused.
    """
    _check_eps_n(epsilon, n_customers)
    k = _Cumulant(w, p)
    target = math.log(epsilon) - math.log(n_customers)
    if k.log_p_max > target:
        logger.warning("threshold: no reachable score meets epsilon=%g over %d customers", epsilon, n_customers)
        return math.inf
    lam = k.threshold_lambda(target)
    return (float(k.value(lam)) - target) / lam


def p_values(
    scores: np.ndarray, w: np.ndarray, p: np.ndarray, n_customers: int
) -> tuple[np.ndarray, np.ndarray]:
    """Upper bounds on the p-values of ``scores`` under the innocent hypothesis.

    ``per_customer[j]`` bounds ``P(S >= scores[j])`` for one innocent (1 for scores
    <= 0); ``family_wise = min(1, n_customers * per_customer)`` bounds the chance that
    any of ``n_customers`` innocents scores that high. Every score is first bounded
    with a fixed grid of Chernoff parameters (any lam >= 0 gives a valid bound, so this
    is vectorised and conservative); scores whose family-wise bound is below 1 -- the
    candidates for accusation -- are then refined with the exact minimum over lam.

    Returns:
        (per_customer, family_wise), float64 arrays shaped like ``scores``.
    """
    _check_eps_n(0.5, n_customers)
    scores = np.asarray(scores, dtype=np.float64)
    k = _Cumulant(w, p)
    log_p = np.zeros(scores.shape)
    positive = scores > 0.0
    if np.any(positive):
        top = float(scores[positive].max())
        lam_max = k.best_lambda(min(top, k.s_max - k.tol))
        lams = np.linspace(0.0, lam_max, _LAMBDA_GRID)
        cumulants = k.value(lams)
        flat = scores.ravel()
        coarse = np.zeros(flat.shape)
        for start in range(0, flat.size, _CHUNK_ROWS):
            s = flat[start : start + _CHUNK_ROWS, None]
            coarse[start : start + s.shape[0]] = np.min(cumulants[None, :] - lams[None, :] * s, axis=1)
        log_p = np.minimum(coarse.reshape(scores.shape), 0.0)
        log_p[~positive] = 0.0
        candidates = np.flatnonzero((log_p.ravel() + math.log(n_customers) < 0.0) & positive.ravel())
        refined = log_p.ravel()
        for j in candidates:  # few: only scores that could be accused
            refined[j] = min(refined[j], k.log_bound(float(flat[j])))
        log_p = refined.reshape(scores.shape)
    per_customer = np.minimum(1.0, np.exp(log_p))
    family_wise = np.minimum(1.0, n_customers * per_customer)
    return per_customer, family_wise
