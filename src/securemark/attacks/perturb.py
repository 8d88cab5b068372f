"""Attacks that perturb the copy's weights without training: Gaussian weight noise."""

from __future__ import annotations

import torch

from securemark import checks
from securemark.attacks.base import Attack, register_attack, working_copy

__all__ = ["Noise"]


@register_attack("noise")
class Noise(Attack):
    """Add Gaussian noise to every parameter tensor of ``models[0]`` (weights and biases),
    with standard deviation ``scale * std(tensor)``: a scale relative to each tensor's
    spread, so every layer is perturbed alike whatever its magnitude.

    Strength: ``scale``.
    """

    def __init__(self, scale: float = 0.1) -> None:
        self.scale = checks.number(self.owner, "scale", scale, 0.0)
        self._config = dict(scale=self.scale)

    @property
    def strength(self) -> float:
        return self.scale

    def apply(self, models, data, generator):
        out = working_copy(models[0])
        with torch.no_grad():
            for p in out.parameters():
                if p.numel() == 0:
                    continue
                spread = p.std(correction=0) if p.numel() > 1 else p.abs().reshape(())
                noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
                p.add_(noise * (self.scale * spread))
        return out
