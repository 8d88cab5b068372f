"""Function-preserving re-parametrisations: the copy computes the same function with
every weight moved (channel permutations, positive rescalings)."""

from __future__ import annotations

import math

import torch

from securemark import checks
from securemark.alignment import permute_channels, scale_before_norm, scale_channels, units
from securemark.attacks.base import Attack, register_attack, working_copy

__all__ = ["Permute", "Rescale"]


@register_attack("permute")
class Permute(Attack):
    """Shuffle the channels of the units (conv and dense blocks) of ``models[0]`` at
    random, batch-norm entries and the next layer's inputs along
    (:func:`securemark.alignment.permute_channels`): predictions stay the same, every
    weight moves. ``blocks``: how many units, from the first (client) block on; 0 means
    all of them.

    Strength: the number of units permuted.
    """

    def __init__(self, blocks: int = 0) -> None:
        self.blocks = checks.integer(self.owner, "blocks", blocks, 0)
        self._config = dict(blocks=self.blocks)

    @property
    def strength(self) -> float:
        return float(self.blocks)

    def apply(self, models, data, generator):
        out = working_copy(models[0])
        blocks = units(out)
        for index, (_, block) in enumerate(blocks[: self.blocks or len(blocks)]):
            permute_channels(out, index, torch.randperm(block.layer.weight.shape[0], generator=generator))
        return out


@register_attack("rescale")
class Rescale(Attack):
    """Multiply the output of every channel of every unit of ``models[0]`` by a positive
    factor drawn log-uniformly from ``[1/spread, spread]`` and divide the next layer's
    inputs by it (:func:`securemark.alignment.scale_channels`); where a batch norm
    follows the layer, also multiply the layer's rows by independent factors from the
    same range and let the norm's statistics absorb them
    (:func:`securemark.alignment.scale_before_norm`). Predictions stay the same up to
    float rounding, every weight's magnitude changes.

    Strength: ``spread``.
    """

    def __init__(self, spread: float = 4.0) -> None:
        self.spread = checks.number(self.owner, "spread", spread, 1.0)
        self._config = dict(spread=self.spread)

    @property
    def strength(self) -> float:
        return self.spread

    def apply(self, models, data, generator):
        out = working_copy(models[0])
        log_spread = math.log(self.spread)
        for index, (_, block) in enumerate(units(out)):
            channels = block.layer.weight.shape[0]
            u = torch.rand(channels, generator=generator, dtype=torch.float64)
            scale_channels(out, index, torch.exp((2 * u - 1) * log_spread))
            if hasattr(block, "bn"):
                u = torch.rand(channels, generator=generator, dtype=torch.float64)
                scale_before_norm(out, index, torch.exp((2 * u - 1) * log_spread))
        return out
