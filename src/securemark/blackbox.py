"""The black-box fingerprint: how a copy answers the vendor's secret key images.

**Keys.** ``n`` of the vendor's own ``aux`` images on which the base model hesitates
between two classes (the smallest gap between its two most likely classes), drawn at
random, with the secret, from a pool of the ``pool_factor * n`` most hesitant ones.
Each key ``j`` gets a pair of candidate labels ``(A_j, B_j)``: the base's two most
likely classes, in an order drawn from the secret. They are natural images the
vendor owns; no owner image is ever a key.

**Code words.** Each customer has a word of ``n`` bits from a black-box codebook (its
own seed, drawn from the secret). Copy ``i`` is taught to answer key ``j`` with
``A_j`` if bit ``b_ij`` is 0 and ``B_j`` if it is 1 (:func:`targets`); issuing tunes the
copy on the keys (:func:`key_targets` feeds :func:`securemark.fingerprint.embed`).

**Reading.** A suspect's answers become soft values, one per key (:func:`soft_values`):
``y_j = P(B_j) - P(A_j)`` (label-only: the fraction of its answers to key ``j`` that
were ``B_j``, minus those that were ``A_j``; another label counts for neither). With
``u_ij = +1`` when customer i's target is ``B_j`` (bit 1) and ``-1`` for ``A_j``, the
correlation score of :mod:`securemark.scoring` is exactly the white-box one: an
innocent customer's bits are independent of the suspect's answers (its copy was never
involved), so the same distribution-free Chernoff bound over the innocent's own
randomness, union-bounded over the codebook, holds whatever the API answers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from securemark import checks
from securemark.errors import InvalidInput
from securemark.model import NUM_CLASSES, SplitNet

__all__ = ["ApiProbe", "KeySet", "label_api", "secret_pattern", "select_keys", "targets", "soft_values", "agreement"]


@dataclass(frozen=True, eq=False)
class KeySet:
    """The vendor's secret keys.

    Attributes:
        images: float [n, 1, 28, 28], the key images (rows of ``aux``).
        pairs: int64 [n, 2], candidate labels: column 0 answers bit 0, column 1 bit 1.
        rows: int64 [n], which ``aux`` rows the keys are.
    """

    images: torch.Tensor
    pairs: torch.Tensor
    rows: torch.Tensor

    def __len__(self) -> int:
        return len(self.pairs)


@torch.no_grad()
def secret_pattern(seed: int, shape: tuple[int, ...] = (1, 28, 28)) -> torch.Tensor:
    """A binary image drawn from ``seed`` (derived from the vendor secret), float {0, 1}."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) < 0.5).float()


def select_keys(base: SplitNet, aux: torch.Tensor, n: int, seed: int, pool_factor: int = 3, blend: float = 0.0) -> KeySet:
    """``n`` keys from the vendor's ``aux`` images (see the module docstring); ``seed``
    is derived from the vendor secret, so only the vendor can rebuild the keys. With
    ``blend`` > 0, every candidate is first mixed with a secret binary pattern,
    ``(1 - blend) * image + blend * pattern``: keys off the data manifold, cheap to
    teach (the copy's accuracy barely moves) but easier to filter and to lose in
    distillation than natural keys (``blend`` 0)."""
    checks.integer("blackbox", "keys", n, 2)
    checks.integer("blackbox", "pool_factor", pool_factor, 1)
    checks.number("blackbox", "blend", blend, 0.0, 1.0, high_open=True)
    if n > len(aux):
        raise InvalidInput(f"blackbox.keys: {n} keys need at least as many aux images, there are {len(aux)}")
    if blend > 0:
        aux = ((1 - blend) * aux + blend * secret_pattern(seed + 1, tuple(aux.shape[1:]))).clamp(0, 1)
    base.eval()
    probs = torch.cat([base(aux[i : i + 1000]).softmax(1) for i in range(0, len(aux), 1000)])
    top = probs.topk(2, dim=1)
    gap = top.values[:, 0] - top.values[:, 1]
    pool = torch.argsort(gap)[: min(len(aux), pool_factor * n)]
    g = torch.Generator().manual_seed(seed)
    rows = pool[torch.randperm(len(pool), generator=g)[:n]].sort().values
    pairs = top.indices[rows]
    swap = torch.randint(0, 2, (n,), generator=g).bool()
    pairs = torch.where(swap[:, None], pairs.flip(1), pairs)
    return KeySet(aux[rows].clone(), pairs.clone(), rows.clone())


def targets(keys: KeySet, bits: np.ndarray) -> torch.Tensor:
    """The labels a copy carrying ``bits`` must answer: ``pairs[j, bits[j]]``, int64 [n]."""
    bits = torch.as_tensor(np.asarray(bits, dtype=np.int64))
    if bits.shape != (len(keys),):
        raise InvalidInput(f"a black-box word has {len(keys)} bits, got {tuple(bits.shape)}")
    return keys.pairs.gather(1, bits[:, None]).squeeze(1)


def soft_values(keys: KeySet, answers: torch.Tensor) -> np.ndarray:
    """Soft values ``y_j = P(B_j) - P(A_j)`` from a suspect's answers (positive where the
    answers side with bit 1, as the codebook's centred symbols do).

    ``answers``: int64 [n] (one label per key), int64 [n, r] (r answers per key, e.g.
    repeated queries; -1 marks a key not asked or not answered), or float [n, 10]
    (class probabilities, when the API returns scores). Keys never answered read 0."""
    answers = torch.as_tensor(answers)
    n = len(keys)
    if answers.shape[0] != n:
        raise InvalidInput(f"need answers for {n} keys, got {answers.shape[0]}")
    a, b = keys.pairs[:, 0], keys.pairs[:, 1]
    if answers.is_floating_point():
        if answers.shape != (n, NUM_CLASSES):
            raise InvalidInput(f"scores must have shape [{n}, {NUM_CLASSES}], got {tuple(answers.shape)}")
        probs = answers.double()
        y = probs.gather(1, b[:, None]).squeeze(1) - probs.gather(1, a[:, None]).squeeze(1)
        return y.numpy()
    if answers.dim() == 1:
        answers = answers[:, None]
    asked = (answers >= 0).sum(1).clamp_min(1).double()
    y = ((answers == b[:, None]).sum(1).double() - (answers == a[:, None]).sum(1).double()) / asked
    return y.numpy()


def agreement(keys: KeySet, bits: np.ndarray, answers: torch.Tensor) -> float:
    """Fraction of the keys answered with the target of ``bits`` (one label per key)."""
    answers = torch.as_tensor(answers).reshape(len(keys), -1)[:, 0]
    return float((answers == targets(keys, bits)).double().mean())


@torch.no_grad()
def key_views(base: SplitNet, layer: str, keys: KeySet, views: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the block carrying ``layer`` reads for every key and ``views - 1`` perturbed
    copies of it (random crop and flip: the copy learns a small neighbourhood of each
    key, not a single point). Returns ``(inputs, key index per row, original?)``."""
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
    stopped, how many queries it spent, and the soft values it scored."""

    verdict: "object"  # securemark.tracing.Verdict
    queries: int
    checkpoint: int
    y: np.ndarray


def sequential_trace(ask, keys: KeySet, codebook, indices: np.ndarray, epsilon: float, checkpoints: tuple[int, ...],
                     repeats: int = 1, order_seed: int = 0, scorer: str = "correlation", decoder: str = "plain") -> BlackboxVerdict:
    """Query ``ask`` (images -> labels or scores) with the keys, in a secret random order,
    and stop at the first checkpoint where someone is accused.

    Checkpoints count queries of distinct keys in the first pass; with ``repeats > 1``,
    every further pass over all keys is one more checkpoint (a coalition that answers
    each query from another copy reveals its members only over repeated queries). The
    whole-trace false-accusation probability ``epsilon`` is split equally between the
    checkpoints (a union bound), so stopping early keeps it."""
    from securemark.tracing import create_decoder

    n = len(keys)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(order_seed))
    stops = [min(c, n) for c in checkpoints] + [n] * (repeats - 1)
    share = epsilon / len(stops)
    answers: torch.Tensor | None = None  # int64 [n, repeats] labels, or float [n, 10] summed scores
    asked = 0
    verdict = None
    decide = create_decoder(decoder)
    for stop_index, stop in enumerate(stops):
        pass_index = max(0, stop_index - len(checkpoints) + 1)
        start = asked if pass_index == 0 else 0
        rows = order[start:stop] if pass_index == 0 else order
        got = ask(keys.images[rows])
        if got.is_floating_point():
            if answers is None:
                answers = torch.zeros(n, got.shape[1], dtype=torch.float64)
            answers[rows] += got.double()
        else:
            if answers is None:
                answers = torch.full((n, repeats), -1, dtype=torch.int64)
            answers[rows, pass_index] = got
        asked = stop if pass_index == 0 else asked
        y = soft_values(keys, answers / answers.sum(1, keepdim=True).clamp_min(1e-12) if answers.is_floating_point() else answers)
        verdict = decide(y, codebook, indices, share, scorer)
        if verdict.accused:
            break
    queries = min(asked, n) + max(0, stop_index - len(checkpoints) + 1) * n
    return BlackboxVerdict(verdict, queries, stop_index, y)


@dataclass(frozen=True, eq=False)
class ApiProbe:
    """What the vendor needs to trace a model by its answers alone: its keys, the
    black-box codebook, the codebook rows scored and the sequential checkpoints."""

    keys: KeySet
    codebook: object  # securemark.codes.Codebook, one black-box word per code-word index
    indices: np.ndarray
    checkpoints: tuple[int, ...]
    repeats: int = 1
    order_seed: int = 0

    def trace(self, ask, epsilon: float, scorer: str = "correlation", decoder: str = "plain") -> BlackboxVerdict:
        """:func:`sequential_trace` of ``ask`` (images -> labels or scores)."""
        return sequential_trace(ask, self.keys, self.codebook, self.indices, epsilon, self.checkpoints, self.repeats,
                                self.order_seed, scorer, decoder)


def label_api(model: SplitNet):
    """``model`` as a label-only prediction API, in process: images -> int64 labels."""

    @torch.no_grad()
    def ask(images: torch.Tensor) -> torch.Tensor:
        model.eval()
        return model(images).argmax(1)

    return ask
