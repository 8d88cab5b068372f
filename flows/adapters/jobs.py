"""The split-training job that the settings and the partitions on disk describe: shared
by the ``train`` stage, the torchrun worker and the privacy audit (which replays the
schedule to know which owner image each feature-bank row came from)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from flows.adapters.paths import VARIANTS, Paths
from flows.adapters.settings import Settings
from securemark.errors import ConfigError
from securemark.model import ModelSpec
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


REFERENCE_CUT = 1  # the undefended reference: the classic early cut, after the first conv block


def reference_spec(spec: ModelSpec) -> ModelSpec:
    """The undefended reference of the product's architecture: the same network without
    the client's bottleneck (part of the defence), cut after the first conv block."""
    return dataclasses.replace(spec, bottleneck=0, cut=REFERENCE_CUT)


def split_job(paths: Paths, settings: Settings, variant: str) -> SplitJob:
    """Split training of ``variant``: ``defended`` is the product (``model``, with its
    bottleneck, and the ``defence`` settings), ``undefended`` the audit's reference: the
    same profile without any defence (:func:`reference_spec`, no noise, no penalty)."""
    if variant not in VARIANTS:
        raise ConfigError("variant", f"unknown variant {variant!r}; choose one of {VARIANTS}")
    defended = variant == "defended"
    defence = settings.defence if defended else DefenceConfig()
    spec = settings.model if defended else reference_spec(settings.model)
    sizes = tuple(len(read_partition(paths.partition(n)).labels) for n in settings.prepare.owner_names)
    return SplitJob(spec, settings.train.config, defence, sizes, OwnerPartitions(paths.partitions))
