"""The split-training job that the settings and the partitions on disk describe: shared
by the ``train`` stage, the torchrun worker and the privacy audit (which replays the
schedule to know which owner image each feature-bank row came from)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from flows.adapters.paths import VARIANTS, Paths
from flows.adapters.settings import Settings
from securemark.errors import ConfigError
from securemark.privacy.defence import DefenceConfig
from securemark.split.protocol import SplitJob
from securemark.storage import read_partition


@dataclass(frozen=True)
class OwnerPartitions:
    """Loads owner k's partition from disk; each owner process reads only its own."""

    partitions: Path

    def __call__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        part = read_partition(self.partitions / f"owner_{k}")
        return part.as_float(), part.labels


def split_job(paths: Paths, settings: Settings, variant: str) -> SplitJob:
    """Split training of ``variant``: ``defended`` uses the ``defence`` settings,
    ``undefended`` the same profile without any defence (the audit's reference)."""
    if variant not in VARIANTS:
        raise ConfigError("variant", f"unknown variant {variant!r}; choose one of {VARIANTS}")
    defence = settings.defence if variant == "defended" else DefenceConfig()
    sizes = tuple(len(read_partition(paths.partition(n)).labels) for n in settings.prepare.owner_names)
    return SplitJob(settings.model, settings.train.config, defence, sizes, OwnerPartitions(paths.partitions))
