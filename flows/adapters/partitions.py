"""The partitions the later stages read, in the form they use them."""

from __future__ import annotations

import torch

from flows.adapters.paths import Paths
from flows.adapters.settings import Settings
from securemark.attacks import AttackData
from securemark.partition import stratified_subset
from securemark.storage import read_partition


def attacker_data(paths: Paths, settings: Settings, budget: int | None = None) -> AttackData:
    """The attacker's own labelled images: ``budget`` (default ``attacker.budget``) of its
    partition, class-balanced."""
    attacker = read_partition(paths.partition("attacker"))
    budget = settings.attacker.budget if budget is None else budget
    index = torch.from_numpy(stratified_subset(attacker.labels.numpy(), budget, settings.base.seed))
    return AttackData(attacker.as_float()[index], attacker.labels[index])


def test_set(paths: Paths) -> tuple[torch.Tensor, torch.Tensor]:
    """The test images (float [N, 1, 28, 28]) and labels (int64 [N])."""
    test = read_partition(paths.partition("test"))
    return test.as_float(), test.labels
