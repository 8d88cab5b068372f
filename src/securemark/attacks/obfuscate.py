"""Weight obfuscation where the data does not look: noise that moves weights a lot and
predictions hardly at all.

For a conv or dense layer, the attacker estimates the covariance of what the layer reads
(its 3x3 input patches, or its input vectors) on its own images, takes the eigenvectors
with the smallest eigenvalues (the directions its data barely excites) and adds Gaussian
noise in their span to every row of the layer's weight, with a total norm of ``scale``
times the weight's norm. The part of the noise that does not average out over the data
(its projection on the input mean) is cancelled: from the batch norm's running mean when
one follows the layer, else from the layer's bias. Everything the data excites is left
as it was, so accuracy barely moves while the raw weights (and any projection of them)
change completely.
"""

from __future__ import annotations

import torch
from torch import nn

from securemark import checks
from securemark.attacks.base import Attack, register_attack, working_copy
from securemark.errors import InvalidConfig
from securemark.model import SplitNet, unit_inputs, units

__all__ = ["Obfuscate"]


@register_attack("obfuscate")
class Obfuscate(Attack):
    """Noise of norm ``scale * ||W||`` in the ``directions`` least excited input directions
    of each chosen layer of ``models[0]`` (``layers``: unit paths such as
    ``server.block2``, or ``all``), estimated on ``samples`` of the attacker's images.
    A layer reading few inputs gets at most an eighth of them (the first conv reads 9
    pixels: 1 direction), so the noise stays where the data does not look.

    Strength: ``scale``.
    """

    list_options = ("layers",)

    def __init__(self, directions: int = 14, scale: float = 10.0, layers: str | list[str] = "all", samples: int = 512) -> None:
        self.directions = checks.integer(self.owner, "directions", directions, 1)
        self.scale = checks.number(self.owner, "scale", scale, 0.0)
        if layers != "all" and (not isinstance(layers, list) or not all(isinstance(x, str) for x in layers)):
            raise InvalidConfig(f"{self.owner}: layers must be 'all' or a list of unit paths such as ['server.block2'], got {layers!r}")
        self.layers = layers
        self.samples = checks.integer(self.owner, "samples", samples, 2)
        self._config = dict(directions=self.directions, scale=self.scale, layers=self.layers, samples=self.samples)

    @property
    def strength(self) -> float:
        return self.scale

    def chosen(self, model: SplitNet) -> list[int]:
        paths = [path for path, _ in units(model)]
        if self.layers == "all":
            return list(range(len(paths)))
        unknown = sorted(set(self.layers) - set(paths))
        if unknown:
            raise InvalidConfig(f"{self.owner}: unknown layers {unknown}; the model's units are {paths}")
        return [paths.index(p) for p in self.layers]

    @torch.no_grad()
    def apply(self, models, data, generator):
        out = working_copy(models[0]).eval()
        images = data.images[torch.randperm(len(data), generator=generator)[: self.samples]]
        for index in self.chosen(out):  # in forward order: later layers see the earlier noise (it changes nothing they read)
            block = units(out)[index][1]
            rows = unit_inputs(out, index, images).to(torch.float64)
            mean = rows.mean(0)
            centred = rows - mean
            covariance = centred.T @ centred / len(rows)
            _, vectors = torch.linalg.eigh(covariance)
            weak = vectors[:, : max(1, min(self.directions, vectors.shape[1] // 8))]  # least excited first
            weight = block.layer.weight
            flat = weight.detach().flatten(1).to(torch.float64)
            noise = torch.randn(flat.shape[0], weak.shape[1], generator=generator, dtype=torch.float64) @ weak.T
            noise *= self.scale * flat.norm() / noise.norm().clamp_min(1e-30)
            shift = noise @ mean  # what the noise adds on average: cancelled below
            weight.add_(noise.to(weight.dtype).view_as(weight))
            bn = getattr(block, "bn", None)
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                bn.running_mean.add_(shift.to(bn.running_mean.dtype))
            elif block.layer.bias is not None:
                block.layer.bias.sub_(shift.to(block.layer.bias.dtype))
        return out
