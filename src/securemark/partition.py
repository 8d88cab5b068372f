"""Split Fashion-MNIST into the parties' partitions (pure: labels in, indices out).

Partitions: ``owner_1..owner_K`` (the data owners' private data), ``aux`` (public
images the vendor holds), ``attacker`` (what a malicious customer owns) and ``test``.
IID partitions are stratified: every class gets an equal share (remainders spread at
random), so small slices are balanced too. ``dirichlet`` gives each owner a label
distribution drawn from Dirichlet(alpha); ``aux``, ``attacker`` and ``test`` stay IID.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from securemark.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

SPLIT_MODES = ("iid", "dirichlet")
TRAIN_TOTAL = 60_000
TEST_TOTAL = 10_000
NUM_CLASSES = 10
MANIFEST_COLUMNS = ["sample_id", "label", "source_index", "partition"]


@dataclass(frozen=True)
class PartitionSpec:
    """Sizes and split mode of every partition (the ``prepare`` params section)."""

    owners: int = 3
    owner_size: int = 10_000
    aux_size: int = 5_000
    attacker_size: int = 10_000
    test_size: int = TEST_TOTAL
    mode: str = "iid"
    dirichlet_alpha: float = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.owners, int) or self.owners < 1:
            raise ConfigError("prepare.owners", f"need at least one data owner, got {self.owners!r}")
        for key in ("owner_size", "aux_size", "attacker_size", "test_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"prepare.{key}", f"must be a positive integer, got {value!r}")
        if self.mode not in SPLIT_MODES:
            raise ConfigError("prepare.mode", f"unknown split mode {self.mode!r}; choose one of {SPLIT_MODES}")
        if not self.dirichlet_alpha > 0:
            raise ConfigError("prepare.dirichlet_alpha", f"must be > 0, got {self.dirichlet_alpha!r}")
        if self.train_total > TRAIN_TOTAL:
            raise ConfigError(
                "prepare.owner_size",
                f"owners * owner_size + aux_size + attacker_size = {self.train_total} exceeds the "
                f"{TRAIN_TOTAL} training images",
            )
        if self.test_size > TEST_TOTAL:
            raise ConfigError("prepare.test_size", f"{self.test_size} exceeds the {TEST_TOTAL} test images")

    @property
    def train_total(self) -> int:
        return self.owners * self.owner_size + self.aux_size + self.attacker_size

    @property
    def owner_names(self) -> list[str]:
        return [f"owner_{k}" for k in range(1, self.owners + 1)]

    @property
    def names(self) -> list[str]:
        return [*self.owner_names, "aux", "attacker", "test"]

    def size_of(self, name: str) -> int:
        if name.startswith("owner_"):
            return self.owner_size
        return {"aux": self.aux_size, "attacker": self.attacker_size, "test": self.test_size}[name]


def _balanced_counts(size: int, rng: np.random.Generator) -> np.ndarray:
    """Per-class counts summing to ``size``, as equal as possible."""
    counts = np.full(NUM_CLASSES, size // NUM_CLASSES, dtype=np.int64)
    counts[rng.permutation(NUM_CLASSES)[: size % NUM_CLASSES]] += 1
    return counts


def _dirichlet_counts(size: int, alpha: float, available: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-class counts for one skewed owner: proportions ~ Dirichlet(alpha), capped by
    what is still available; a shortfall moves to the classes that still have images."""
    proportions = rng.dirichlet(np.full(NUM_CLASSES, alpha))
    counts = np.minimum(np.floor(proportions * size).astype(np.int64), available)
    while counts.sum() < size:
        room = available - counts
        weights = np.where(room > 0, proportions + 1e-12, 0.0)
        cls = rng.choice(NUM_CLASSES, p=weights / weights.sum())
        counts[cls] += 1
    return counts


def split(train_labels: np.ndarray, test_labels: np.ndarray, spec: PartitionSpec, seed: int) -> dict[str, np.ndarray]:
    """Return ``{partition name: sorted source indices}``; deterministic in ``seed``.

    Training partitions index ``train_labels`` and never share an index; ``test``
    indexes ``test_labels``.
    """
    train_labels = np.asarray(train_labels)
    if len(train_labels) < spec.train_total:
        raise ConfigError("prepare.owner_size", f"partitions need {spec.train_total} images, dataset has {len(train_labels)}")
    rng = np.random.default_rng(seed)
    pools = [rng.permutation(np.flatnonzero(train_labels == c)) for c in range(NUM_CLASSES)]
    taken = np.zeros(NUM_CLASSES, dtype=np.int64)

    def take(counts: np.ndarray) -> np.ndarray:
        picked = [pools[c][taken[c] : taken[c] + counts[c]] for c in range(NUM_CLASSES)]
        taken[:] += counts
        return np.sort(np.concatenate(picked)).astype(np.int64)

    # Reserve the IID partitions first so that skewed owners cannot starve them.
    result: dict[str, np.ndarray] = {}
    for name in ("aux", "attacker"):
        result[name] = take(_balanced_counts(spec.size_of(name), rng))
    for name in spec.owner_names:
        if spec.mode == "iid":
            counts = _balanced_counts(spec.owner_size, rng)
        else:
            available = np.array([len(p) for p in pools]) - taken
            counts = _dirichlet_counts(spec.owner_size, spec.dirichlet_alpha, available, rng)
        if np.any(taken + counts > [len(p) for p in pools]):
            raise ConfigError("prepare.owner_size", "not enough images of some class for balanced partitions")
        result[name] = take(counts)

    test_labels = np.asarray(test_labels)
    test_pools = [rng.permutation(np.flatnonzero(test_labels == c)) for c in range(NUM_CLASSES)]
    test_counts = _balanced_counts(spec.test_size, rng) if spec.test_size < len(test_labels) else None
    if test_counts is None:
        result["test"] = np.arange(len(test_labels), dtype=np.int64)
    else:
        result["test"] = np.sort(np.concatenate([test_pools[c][: test_counts[c]] for c in range(NUM_CLASSES)]))
    return {name: result[name] for name in spec.names}


def manifest(name: str, indices: np.ndarray, labels: np.ndarray) -> "pd.DataFrame":
    """One row per image: sample id (unique across the dataset), label, source index, partition."""
    import pandas as pd  # here, not at import: the params parser reads this module, the trace command need not load pandas

    source = "test" if name == "test" else "train"
    return pd.DataFrame(
        {
            "sample_id": [f"{source}-{i:05d}" for i in indices],
            "label": np.asarray(labels)[indices].astype(np.int64),
            "source_index": indices.astype(np.int64),
            "partition": name,
        },
        columns=MANIFEST_COLUMNS,
    )


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted row indices of a class-balanced subset of ``size`` rows (as equal per class as
    the rows allow), deterministic in ``seed``; nested: a smaller ``size`` with the same
    seed picks a subset of a larger one's rows. Used for the attacker's data budget."""
    labels = np.asarray(labels)
    if not 1 <= size <= len(labels):
        raise ConfigError("attacker.budget", f"must be between 1 and the {len(labels)} images of the attacker partition, got {size}")
    rng = np.random.default_rng(seed)
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in range(NUM_CLASSES)]
    classes = rng.permutation(NUM_CLASSES)
    order = []  # round robin over the classes: every prefix is as balanced as it can be
    for rank in range(max(len(p) for p in pools)):
        order.extend(int(pools[c][rank]) for c in classes if rank < len(pools[c]))
    return np.sort(np.asarray(order[:size], dtype=np.int64))
