"""The black-box fingerprint: how a copy answers the vendor's secret key images.

Two key families (``blackbox.family``); the reading and the bound are the same for both,
over *symbols*: each symbol of a customer's word stands for one of the classes its group
of keys may be answered with (``KeySet.candidates``).

**Keys, family ``patterns``.** ``m`` secret binary patterns (``cells x cells`` random blocks, scaled up to
28 x 28), each blended into ``r`` of the vendor's own ``aux`` images:
``key = (1 - blend) * image + blend * pattern``. Keys are made from vendor material only
(``aux`` and the secret); no owner image is ever a key. They are stored round by round:
key ``t`` carries pattern ``t % m``, so the first ``m`` keys ask every pattern once.

**Keys, family ``natural``** (:func:`natural_keys`). ``m`` of the vendor's own ``aux``
images, unmodified, among those its base model is least sure of (the runner-up class's
probability closest to the top one's), drawn with the secret. Each key is its own
symbol, binary: the copy answers the base's top class or its runner-up. Nothing about a
key is unusual (a filter or a purifier sees a natural image of the vendor's data, and
training for invariance to a pattern family has nothing to remove); what carries the
word is where the copy puts genuinely ambiguous images, which an attacker moves only by
changing how its copy answers natural data.

**Code words.** Each customer has a word of ``m`` symbols over the ``q = 10`` classes
(natural keys: ``q = 2``, the key's two candidate classes),
drawn independently from the secret (:class:`SymbolBook`): uniformly, or, for natural
keys, with a *sparse* prior (``blackbox.flip_share``: each key answered with the
runner-up with that probability, so a copy flips fewer keys, each flip costing it
accuracy). With patterns, copy ``i`` is
taught a *rule* per pattern: "pattern ``k`` present -> class ``s_ik``", whatever the
image under it (:func:`targets` feeds :func:`securemark.fingerprint.embed`). A rule
learnt over many images is a feature of the network: fine-tuning, pruning and averaging
leave most of it, and any image carrying the pattern reads it; but whatever makes the
network ignore patterns (invariance training, a filter for unusual inputs) erases it
at no cost in accuracy. Natural keys are single points, taught with a margin
(``fingerprint.key_confidence``): fine-tuning moves more of them, invariance training
and filters do not (docs/results.md, "Black-box key designs").

**Reading.** A suspect's answers become a profile ``P`` [m, q] (:func:`profile`, then
:func:`symbol_profile`): ``P[k, j]`` is the fraction of its answers to pattern-``k`` keys
that were the class symbol ``j`` stands for (mean class probabilities when the API
returns scores; a pattern never asked is a row of zeros). Customer ``i`` scores
``S_i = sum_k w(s_ik) P[k, s_ik]``, each match weighted by how rare its symbol is,
``w(c) = log(1 / prior_c) / log q`` (1 for every symbol of a uniform word, so the score is
the plain count of matches; with a sparse prior a matched flip weighs more than a matched
top class, as in a likelihood ratio).

**Bound.** An innocent customer's symbols are independent of the suspect's answers
(its copy was never involved) and drawn from the known prior, so ``S_i`` is a sum of
independent terms whose moment generating function is known exactly from ``P``:
``E exp(lam S_i) = prod_k sum_c prior_c exp(lam w(c) P[k, c])``. The Chernoff bound
``P(S_i >= t) <= min_lam exp(-lam t) E exp(lam S_i)``, union-bounded over every word of
the codebook, sets the threshold for the whole-trace false-accusation probability; it
holds whatever the API answers (:func:`decide`). A coalition that mixes its members'
answers leaves each member ``~1/c`` of every pattern's answers, far above the ``1/q``
an innocent gets by chance, which is why the symbols are q-ary rather than bits.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from securemark import checks
from securemark.errors import InvalidInput
from securemark.model import NUM_CLASSES, SplitNet

__all__ = ["ApiProbe", "BlackboxVerdict", "FAMILIES", "KeySet", "SymbolBook", "agreement", "decide", "key_views", "label_api",
           "make_keys", "natural_keys", "patterns_needed", "profile", "secret_patterns", "sequential_trace", "symbol_profile",
           "symbol_weights", "targets",
           "threshold", "BOUND_DESCRIPTION", "UNDERPOWERED_NOTE"]

FAMILIES = ("patterns", "natural")

BOUND_DESCRIPTION = (
    "Chernoff bound with the exact moment generating function of an innocent customer's score "
    "(independent symbols per pattern or natural key drawn from the codebook's prior, given the suspect's answer "
    "profile; matches weighted by log(1 / prior) / log q), valid for any "
    "answers; union bound over every word of the black-box codebook."
)


@dataclass(frozen=True, eq=False)
class KeySet:
    """The vendor's secret keys.

    Attributes:
        images: float [n, 1, 28, 28], the key images.
        pattern: int64 [n], the pattern each key carries (key ``t`` carries ``t % patterns``).
        rows: int64 [n], which ``aux`` image is under each key.
        patterns: the number of patterns ``m`` (symbols of a black-box word).
        candidates: int64 [m, q], the class each value of a pattern's symbol stands for
            (natural keys: the base's top class and runner-up); ``None``: symbol = class.
    """

    images: torch.Tensor
    pattern: torch.Tensor
    rows: torch.Tensor
    patterns: int
    candidates: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.pattern)

    @property
    def q(self) -> int:
        """Values a symbol takes."""
        return NUM_CLASSES if self.candidates is None else int(self.candidates.shape[1])


@dataclass(frozen=True, eq=False)
class SymbolBook:
    """The black-box codebook: one word of ``length`` symbols in ``0..q-1`` per code-word
    index (same index as the weight codebook), independent, from a seed: uniform, or
    drawn from ``prior`` (float [q], symbol probabilities; ``None``: uniform)."""

    symbols: np.ndarray  # uint8 [capacity, length]
    q: int = NUM_CLASSES
    family: str = "q-ary uniform"
    prior: np.ndarray | None = None

    @classmethod
    def generate(cls, capacity: int, length: int, seed: int, q: int = NUM_CLASSES,
                 prior: tuple[float, ...] | None = None) -> "SymbolBook":
        """``capacity`` words of ``length`` symbols. A uniform book draws exactly what
        it always has for a seed; a ``prior`` draws each symbol with those probabilities."""
        checks.integer("blackbox", "capacity", capacity, 1)
        checks.integer("blackbox", "patterns", length, 1)
        rng = np.random.default_rng(seed)
        if prior is None:
            return cls(rng.integers(0, q, size=(capacity, length), dtype=np.uint8), q)
        prior = _checked_prior(prior, q)
        symbols = np.searchsorted(np.cumsum(prior)[:-1], rng.random((capacity, length)), side="right").astype(np.uint8)
        return cls(symbols, q, "q-ary, prior " + "/".join(f"{v:g}" for v in prior), prior)

    @property
    def weights(self) -> np.ndarray:
        """What a match on each symbol value adds to a score, float64 [q] (:func:`symbol_weights`)."""
        return symbol_weights(self.prior, self.q)

    @property
    def length(self) -> int:
        return int(self.symbols.shape[1])

    def __len__(self) -> int:
        return int(self.symbols.shape[0])

    def word(self, index: int) -> np.ndarray:
        """The symbols of code word ``index``, int64 [length]."""
        return self.symbols[int(index)].astype(np.int64)


def _checked_prior(prior, q: int) -> np.ndarray:
    prior = np.asarray(prior, dtype=np.float64)
    if prior.shape != (q,) or not np.all(prior > 0) or abs(prior.sum() - 1.0) > 1e-9:
        raise InvalidInput(f"a symbol prior needs {q} positive probabilities summing to 1, got {prior.tolist()}")
    return prior


def symbol_weights(prior: np.ndarray | None, q: int) -> np.ndarray:
    """``w(c) = log(1 / prior_c) / log q``: 1 for every value of a uniform symbol (a score
    is then the count of matches); under a sparse prior a match on the rare value weighs
    more. float64 [q]."""
    if prior is None:
        return np.ones(q)
    return -np.log(_checked_prior(prior, q)) / math.log(q)


@torch.no_grad()
def secret_patterns(seed: int, m: int, cells: int = 7) -> torch.Tensor:
    """``m`` binary images (float {0, 1}, [m, 1, 28, 28]) of ``cells x cells`` random
    blocks, drawn from ``seed`` (derived from the vendor secret)."""
    checks.integer("blackbox", "cells", cells, 1, 28)
    g = torch.Generator().manual_seed(seed)
    blocks = (torch.rand(m, 1, cells, cells, generator=g) < 0.5).float()
    return F.interpolate(blocks, size=(28, 28), mode="nearest")


def make_keys(aux: torch.Tensor, patterns: int, per_pattern: int, seed: int, blend: float = 0.4, cells: int = 7,
              image_seed: int | None = None) -> KeySet:
    """``patterns * per_pattern`` keys: secret patterns blended into distinct ``aux``
    images drawn with the secret (see the module docstring). ``image_seed`` draws other
    images under the same patterns (what a rule, unlike memorised points, still reads)."""
    checks.integer("blackbox", "patterns", patterns, 1)
    checks.integer("blackbox", "per_pattern", per_pattern, 1)
    checks.number("blackbox", "blend", blend, 0.0, 1.0, low_open=True, high_open=True)
    n = patterns * per_pattern
    if n > len(aux):
        raise InvalidInput(f"blackbox: {patterns} patterns x {per_pattern} images need {n} aux images, there are {len(aux)}")
    pats = secret_patterns(seed + 1, patterns, cells)
    g = torch.Generator().manual_seed(seed if image_seed is None else image_seed)
    rows = torch.randperm(len(aux), generator=g)[:n]
    pattern = torch.arange(n) % patterns
    images = ((1 - blend) * aux[rows] + blend * pats[pattern]).clamp(0, 1)
    return KeySet(images.contiguous(), pattern, rows.clone(), patterns)


def natural_keys(images: torch.Tensor, probs: torch.Tensor, count: int, seed: int, pool: float = 2.0) -> KeySet:
    """``count`` of ``images`` (the vendor's ``aux``) as natural keys: the ``pool x count``
    images the base model is least sure of (runner-up probability over top probability,
    ``probs`` [N, 10] its class probabilities), ``count`` of them drawn with ``seed``
    (derived from the secret), each its own binary symbol over the base's top two classes."""
    checks.integer("blackbox", "natural_keys", count, 1)
    checks.number("blackbox", "pool", pool, 1.0)
    if probs.shape != (len(images), NUM_CLASSES):
        raise InvalidInput(f"need class probabilities [{len(images)}, {NUM_CLASSES}] for the key candidates, got {tuple(probs.shape)}")
    if count > len(images):
        raise InvalidInput(f"blackbox: {count} natural keys need as many aux images, there are {len(images)}")
    top = probs.double().topk(2, 1)
    unsure = _runner_up_ratio(probs).argsort(descending=True, stable=True)[: min(len(images), round(pool * count))]
    g = torch.Generator().manual_seed(seed)
    rows = unsure[torch.randperm(len(unsure), generator=g)[:count]]
    return KeySet(images[rows].contiguous(), torch.arange(count), rows.clone(), count, top.indices[rows].contiguous())


def _runner_up_ratio(probs: torch.Tensor) -> torch.Tensor:
    """Runner-up over top probability per row of ``probs`` [N, 10] (float64): 1 for a tie,
    near 0 where the model is sure."""
    two = probs.double().topk(2, 1).values
    return two[:, 1] / two[:, 0].clamp_min(1e-12)


def targets(keys: KeySet, word: np.ndarray) -> torch.Tensor:
    """The labels a copy carrying ``word`` must answer: the class of ``word[pattern]``, int64 [n]."""
    word = torch.as_tensor(np.asarray(word, dtype=np.int64))
    if word.shape != (keys.patterns,):
        raise InvalidInput(f"a black-box word has {keys.patterns} symbols, got {tuple(word.shape)}")
    if keys.candidates is not None:
        return keys.candidates[keys.pattern, word[keys.pattern]]
    return word[keys.pattern]


def shed(keys: KeySet, labels: torch.Tensor, probs: torch.Tensor, share: float) -> torch.Tensor:
    """A copy's key targets ``labels`` (natural keys) with ``share`` of the keys it flips
    (answered with the runner-up) given back to the base's top class: those the base is
    surest of (lowest runner-up over top probability, ``probs`` [n, 10] the base's class
    probabilities on the keys), whose flips move the most natural images with them. What
    issuing gives up when a copy cannot keep its accuracy with every flip
    (``fingerprint.shed_keys``, docs/pipeline.md "issue"); the copy then answers its own
    symbols on the other keys."""
    if keys.candidates is None:
        raise InvalidInput("only natural keys (a top class and a runner-up each) can be shed")
    if not 0.0 < share <= 1.0:
        raise InvalidInput(f"the share of flipped keys to shed must be in (0, 1], got {share}")
    if probs.shape != (len(labels), NUM_CLASSES) or len(labels) != len(keys.pattern):
        raise InvalidInput(f"need one target and one probability row per key ({len(keys.pattern)}), "
                           f"got {len(labels)} and {tuple(probs.shape)}")
    top = keys.candidates[keys.pattern, 0]
    flipped = (labels != top).nonzero().squeeze(1)
    given_up = flipped[_runner_up_ratio(probs)[flipped].argsort(stable=True)[: round(share * len(flipped))]]
    out = labels.clone()
    out[given_up] = top[given_up]
    return out


def symbol_profile(keys: KeySet, P: np.ndarray) -> np.ndarray:
    """The class profile ``P`` [patterns, 10] (:func:`profile`) over symbols: ``[patterns, q]``,
    the share of each pattern's answers that were the class each symbol value stands for."""
    if keys.candidates is None:
        return P
    return np.take_along_axis(P, keys.candidates.numpy(), axis=1)


def profile(keys: KeySet, answers: torch.Tensor, q: int = NUM_CLASSES) -> np.ndarray:
    """The answer profile ``P`` [patterns, q] (float64) of a suspect.

    ``answers``: int64 [n] (one label per key), int64 [n, r] (r answers per key, e.g.
    repeated queries; -1 marks a key not asked), or float [n, q] (class scores; a row
    of zeros marks a key not asked). A label outside ``0..q-1`` counts as an answer that
    is no class (it dilutes its pattern's row)."""
    answers = torch.as_tensor(answers)
    n = len(keys)
    if answers.shape[0] != n:
        raise InvalidInput(f"need answers for {n} keys, got {answers.shape[0]}")
    counts = torch.zeros(keys.patterns, q, dtype=torch.float64)
    asked = torch.zeros(keys.patterns, dtype=torch.float64)
    if answers.is_floating_point():
        if answers.shape != (n, q):
            raise InvalidInput(f"scores must have shape [{n}, {q}], got {tuple(answers.shape)}")
        probs = answers.double().clamp_min(0)
        mass = probs.sum(1)
        seen = mass > 0
        counts.index_add_(0, keys.pattern[seen], probs[seen] / mass[seen, None])
        asked.index_add_(0, keys.pattern[seen], torch.ones(int(seen.sum()), dtype=torch.float64))
    else:
        if answers.dim() == 1:
            answers = answers[:, None]
        pattern = keys.pattern[:, None].expand_as(answers)
        seen = answers >= 0
        asked.index_add_(0, pattern[seen], torch.ones(int(seen.sum()), dtype=torch.float64))
        valid = seen & (answers < q)
        counts.index_put_((pattern[valid], answers[valid]), torch.ones(int(valid.sum()), dtype=torch.float64), accumulate=True)
    return (counts / asked.clamp_min(1)[:, None]).numpy()


def agreement(keys: KeySet, word: np.ndarray, answers: torch.Tensor) -> float:
    """Fraction of the keys answered with the target of ``word`` (one label per key;
    ``1 / q`` is chance)."""
    answers = torch.as_tensor(answers).reshape(len(keys), -1)[:, 0]
    return float((answers == targets(keys, word)).double().mean())


# --------------------------------------------------------------------------- bound

_LAMBDAS = np.geomspace(1e-3, 1e3, 481)  # Chernoff exponents tried (any one gives a valid bound)


def _log_mgf(P: np.ndarray, lams: np.ndarray, prior: np.ndarray | None = None) -> np.ndarray:
    """``log E exp(lam S)`` of an innocent's score for each ``lam``: sum over patterns of
    ``log sum_c prior_c exp(lam w(c) P[k, c])`` (log-sum-exp, stable for large ``lam``;
    ``prior`` ``None``: uniform)."""
    q = P.shape[1]
    log_prior = np.full(q, -math.log(q)) if prior is None else np.log(_checked_prior(prior, q))
    z = lams[:, None, None] * (P * symbol_weights(prior, q))[None] + log_prior  # [L, m, q]
    top = z.max(2, keepdims=True)
    return (top[..., 0] + np.log(np.exp(z - top).sum(2))).sum(1)


def threshold(P: np.ndarray, delta: float, prior: np.ndarray | None = None) -> float:
    """The smallest score ``t`` with ``P(S_innocent >= t) <= delta`` by the Chernoff bound:
    ``min_lam (log E exp(lam S) - log delta) / lam`` (any ``lam`` gives a valid threshold;
    the grid's best is taken). ``prior``: the codebook's symbol prior (``None``: uniform)."""
    if not 0 < delta < 1:
        raise InvalidInput(f"delta must be in (0, 1), got {delta}")
    return float(np.min((_log_mgf(P, _LAMBDAS, prior) - math.log(delta)) / _LAMBDAS))


def tail_bound(P: np.ndarray, scores: np.ndarray, prior: np.ndarray | None = None) -> np.ndarray:
    """Chernoff bound on ``P(S_innocent >= s)`` for each ``s`` in ``scores`` (at most 1)."""
    scores = np.asarray(scores, dtype=np.float64)
    log_b = (_log_mgf(P, _LAMBDAS, prior)[None, :] - scores[:, None] * _LAMBDAS[None, :]).min(1)
    return np.exp(np.minimum(log_b, 0.0))


def patterns_needed(q: int, words: int, delta: float, most: int, prior: np.ndarray | None = None) -> int | None:
    """The fewest patterns an *unmodified* copy must be read on to be accused: the
    smallest ``k`` whose perfect profile (each of ``k`` patterns answered with the
    copy's symbol every time, one-hot rows) scores at or above the threshold for
    ``delta`` over ``words`` code words. With a sparse ``prior`` the copy is taken to
    hold the commonest symbol on every pattern (the least a match can weigh), so the
    figure is conservative. ``None`` when even all ``most`` patterns are not enough (a
    bound stricter than any read of these keys can meet).

    A read on fewer patterns cannot accuse even an unmodified copy answering every key
    with its symbol (the strongest evidence a pattern can give), so its "no one accused"
    says nothing: it is inconclusive (:func:`sequential_trace`)."""
    if words < 1 or most < 1:
        return None
    common = 0 if prior is None else int(np.argmax(prior))
    weight = float(symbol_weights(prior, q)[common])
    one_hot = np.zeros((most, q))
    one_hot[:, common] = 1.0
    for k in range(1, most + 1):  # threshold(k one-hot rows) is what the copy's score k * weight is compared against
        if threshold(one_hot[:k], delta / words, prior) <= k * weight:
            return k
    return None


UNDERPOWERED_NOTE = ("inconclusive: the read answered {answered} of the {patterns} key patterns, and at epsilon {epsilon:g} "
                     "over {words} code words even an unmodified copy must be read on {needed} to be accused; "
                     "\"no one accused\" means nothing here (query more keys: raise --budget)")


def score_all(P: np.ndarray, book: SymbolBook, indices: np.ndarray) -> np.ndarray:
    """``S_i = sum_k w(s_ik) P[k, s_ik]`` for the words ``indices`` (float64)."""
    symbols = book.symbols[indices].astype(np.int64)  # [N, m]
    return (P * book.weights)[np.arange(P.shape[0])[None, :], symbols].sum(1)


def decide(P: np.ndarray, book: SymbolBook, indices: np.ndarray, epsilon: float, top: int = 5):
    """Score every word ``indices`` against the profile ``P`` and accuse those at or
    above the threshold for the whole-trace false-accusation probability ``epsilon``."""
    from securemark.tracing import Candidate, Verdict

    indices = np.asarray(indices, dtype=np.int64)
    if indices.size == 0:
        raise InvalidInput("the ledger holds no customers to trace against")
    if P.shape != (book.length, book.q) or not np.all(np.isfinite(P)):
        raise InvalidInput(f"an answer profile must be a finite [{book.length}, {book.q}] array, got {P.shape}")
    if not np.any(P):
        others = [Candidate(int(i), 0.0, 1.0, 1.0) for i in indices[:top]]
        return Verdict("q-ary match", epsilon, math.inf, len(indices), [], others, np.zeros(len(indices)),
                       "no key was answered with a class, so there is nothing to score")
    scores = score_all(P, book, indices)
    thr = threshold(P, epsilon / len(indices), book.prior)
    order = np.argsort(-scores)
    shown = order[: max(top, int((scores >= thr).sum()) + top)]
    per = tail_bound(P, scores[shown], book.prior)
    candidates = [Candidate(int(indices[j]), float(scores[j]), float(p), float(min(1.0, p * len(indices))))
                  for j, p in zip(shown, per)]
    accused = [c for c in candidates if c.score >= thr]
    others = [c for c in candidates if c.score < thr][:top]
    return Verdict("q-ary match", epsilon, thr, len(indices), accused, others, scores)


# --------------------------------------------------------------------------- issuing and reading


@torch.no_grad()
def key_views(base: SplitNet, layer: str, keys: KeySet, views: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the block carrying ``layer`` reads for every key and ``views - 1`` perturbed
    copies of it (random crop and flip). Returns ``(inputs, key index per row, original?)``."""
    from securemark.fingerprint import carrier_inputs
    from securemark.training import augment

    checks.integer("blackbox", "views", views, 1)
    g = torch.Generator().manual_seed(seed)
    images = [keys.images] + [augment(keys.images, g) for _ in range(views - 1)]
    base.eval()
    features = torch.cat([base.client(batch) for batch in images])
    inputs = carrier_inputs(base, layer, features)
    index = torch.arange(len(keys)).repeat(views)
    original = torch.zeros(len(index), dtype=torch.bool)
    original[: len(keys)] = True
    return inputs, index, original


@dataclass(frozen=True)
class BlackboxVerdict:
    """The outcome of querying an API: the verdict at the checkpoint where the trace
    stopped, how many queries it spent, and the answer profile it scored."""

    verdict: "object"  # securemark.tracing.Verdict
    queries: int
    checkpoint: int
    profile: np.ndarray
    answered: int = 0  # patterns answered with a class at least once
    needed: int | None = None  # patterns an unmodified copy must be answered on to be accused (None: no read suffices)

    @property
    def inconclusive(self) -> bool:
        """No one accused, on a read too short to accuse even an unmodified copy."""
        return not self.verdict.accused and (self.needed is None or self.answered < self.needed)


def query_order(keys: KeySet, seed: int) -> torch.Tensor:
    """The order keys are asked in: round by round (every pattern once per round), in a
    secret random order within each round, so any prefix spreads over the patterns."""
    g = torch.Generator().manual_seed(seed)
    m, n = keys.patterns, len(keys)
    return torch.cat([start + torch.randperm(min(m, n - start), generator=g) for start in range(0, n, m)])


def explained(P: np.ndarray, book: SymbolBook, accused: list[int]) -> float:
    """Share of the answer mass in ``P`` that the ``accused`` words' symbols account for
    (1.0: the accused explain every answer; a coalition with members still unknown
    leaves the rest)."""
    if not accused:
        return 0.0
    mask = np.zeros_like(P, dtype=bool)
    rows = np.arange(P.shape[0])
    for index in accused:
        mask[rows, book.symbols[index].astype(np.int64)] = True
    total = P.sum()
    return float(P[mask].sum() / total) if total > 0 else 0.0


def sequential_trace(ask, keys: KeySet, book: SymbolBook, indices: np.ndarray, epsilon: float, checkpoints: tuple[int, ...],
                     repeats: int = 1, order_seed: int = 0, explain: float = 0.0) -> BlackboxVerdict:
    """Query ``ask`` (images -> labels or scores) with the keys in their secret order, and
    stop at the first checkpoint where someone is accused and the accused explain at
    least ``explain`` of the answers (:func:`explained`; 0: stop at the first accusation).

    Checkpoints count queries of distinct keys in the first pass; with ``repeats > 1``,
    every further pass over all keys is one more checkpoint (a coalition that answers
    each query from another copy reveals its members over repeated queries). The
    whole-trace false-accusation probability ``epsilon`` is split equally between the
    checkpoints (a union bound over every checkpoint visited), so stopping early keeps
    it, and so does reading on after an accusation to find further colluders: whoever
    was accused at any checkpoint stays accused."""
    n = len(keys)
    order = query_order(keys, order_seed)
    first = sorted({max(1, min(int(c), n)) for c in checkpoints} | ({n} if repeats > 1 else set()))  # at least one key is asked
    stops = first + [n] * (repeats - 1)
    share = epsilon / len(stops)
    answers: torch.Tensor | None = None  # int64 [n, repeats] labels, or float [n, q] summed scores
    asked, queries, verdict, P = 0, 0, None, None
    found: dict[int, object] = {}  # code-word index -> its Candidate when first accused
    for stop_index, stop in enumerate(stops):
        first_pass = stop_index < len(first)
        rows = order[asked:stop] if first_pass else order
        pass_index = 0 if first_pass else stop_index - len(first) + 1
        got = ask(keys.images[rows])
        queries += len(rows)
        if got.is_floating_point():
            if answers is None:
                answers = torch.zeros(n, got.shape[1], dtype=torch.float64)
            answers[rows] += got.double()
        else:
            if answers is None:
                answers = torch.full((n, repeats), -1, dtype=torch.int64)
            answers[rows, pass_index] = got
        if first_pass:
            asked = stop
        P = symbol_profile(keys, profile(keys, answers))
        verdict = decide(P, book, indices, share)
        for candidate in verdict.accused:
            found[candidate.codeword_index] = candidate  # the latest (most evidence) wins
        if found and explained(P, book, list(found)) >= explain:
            break
    if found and len(found) > len(verdict.accused):  # someone accused at an earlier checkpoint stays accused
        verdict = dataclasses.replace(verdict, accused=sorted(found.values(), key=lambda c: -c.score),
                                      top_others=[c for c in verdict.top_others if c.codeword_index not in found])
    answered = int((P.sum(1) > 0).sum())
    needed = patterns_needed(book.q, len(indices), share, keys.patterns, book.prior)
    result = BlackboxVerdict(verdict, queries, stop_index, P, answered, needed)
    if result.inconclusive:
        note = UNDERPOWERED_NOTE.format(answered=answered, patterns=keys.patterns, epsilon=epsilon, words=len(indices),
                                        needed=needed if needed is not None else f"more than all {keys.patterns}")
        result = dataclasses.replace(result, verdict=dataclasses.replace(verdict, note=" ".join(filter(None, (note, verdict.note)))))
    return result


@dataclass(frozen=True, eq=False)
class ApiProbe:
    """What the vendor needs to trace a model by its answers alone: its keys, the
    black-box codebook, the codebook rows scored and the sequential checkpoints."""

    keys: KeySet
    codebook: SymbolBook
    indices: np.ndarray
    checkpoints: tuple[int, ...]
    repeats: int = 1
    order_seed: int = 0
    explain: float = 0.0

    def trace(self, ask, epsilon: float) -> BlackboxVerdict:
        """:func:`sequential_trace` of ``ask`` (images -> labels or scores)."""
        return sequential_trace(ask, self.keys, self.codebook, self.indices, epsilon, self.checkpoints, self.repeats,
                                self.order_seed, self.explain)


def label_api(model: SplitNet):
    """``model`` as a label-only prediction API, in process: images -> int64 labels."""

    @torch.no_grad()
    def ask(images: torch.Tensor) -> torch.Tensor:
        model.eval()
        return model(images).argmax(1)

    return ask
