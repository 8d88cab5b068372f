"""The classifier, built in two parts: ``server(client(x))``.

``client`` is the privacy partition (the first conv blocks, run by each data owner);
``server`` is the rest (run by the vendor). The cut point and the widths are params.
Parameter names are stable and readable, e.g. ``client.block1.conv.weight``,
``server.block3.conv.weight``, ``server.fc.weight``; the full model saves and loads as
one state dict.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from securemark.errors import ConfigError

IMAGE_SIZE = 28
NUM_CLASSES = 10


@dataclass(frozen=True)
class ModelSpec:
    """Architecture: one 3x3 conv + ReLU + 2x2 max-pool block per width; then a linear head.

    ``cut`` blocks run at the data owners (the privacy partition), the rest at the vendor.
    """

    widths: tuple[int, ...] = (16, 32, 64)
    cut: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if not self.widths or any(w < 1 for w in self.widths):
            raise ConfigError("model.widths", f"need one or more positive widths, got {list(self.widths)}")
        if len(self.widths) > 4:
            raise ConfigError("model.widths", "at most 4 blocks fit a 28x28 image (each halves it)")
        if not 1 <= self.cut <= len(self.widths):
            raise ConfigError("model.cut", f"must be between 1 and {len(self.widths)} (client needs a block), got {self.cut}")

    def spatial(self, blocks: int) -> int:
        size = IMAGE_SIZE
        for _ in range(blocks):
            size //= 2
        return size

    @property
    def cut_shape(self) -> tuple[int, int, int]:
        """Shape (C, H, W) of one smashed feature map: what crosses the boundary."""
        s = self.spatial(self.cut)
        return (self.widths[self.cut - 1], s, s)


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(conv=nn.Conv2d(c_in, c_out, kernel_size=3, padding=1), relu=nn.ReLU(), pool=nn.MaxPool2d(2))
    )


def build_client(spec: ModelSpec) -> nn.Sequential:
    channels = (1, *spec.widths)
    return nn.Sequential(OrderedDict((f"block{i + 1}", _block(channels[i], channels[i + 1])) for i in range(spec.cut)))


def build_server(spec: ModelSpec) -> nn.Sequential:
    channels = (1, *spec.widths)
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        (f"block{i + 1}", _block(channels[i], channels[i + 1])) for i in range(spec.cut, len(spec.widths))
    )
    s = spec.spatial(len(spec.widths))
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(spec.widths[-1] * s * s, NUM_CLASSES)
    return nn.Sequential(layers)


class SplitNet(nn.Module):
    """The full classifier, ``server(client(x))``; x: float [B, 1, 28, 28] in [0, 1]."""

    def __init__(self, spec: ModelSpec, client: nn.Module | None = None, server: nn.Module | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.client = client if client is not None else build_client(spec)
        self.server = server if server is not None else build_server(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.server(self.client(x))


def init_weights(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """PyTorch's default conv/linear initialisation, drawn from ``generator`` (not the
    global RNG), so that initial weights are a function of the seed alone."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            fan_in = module.weight[0].numel()
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(module.bias, -bound, bound, generator=generator)
    return model


def build_model(spec: ModelSpec, seed: int) -> SplitNet:
    """A freshly initialised model whose weights depend only on ``seed``."""
    # nn.Conv2d/nn.Linear draw default weights from the global generator while they are
    # built; fork it so the caller's RNG stream is left as it was (weights are then
    # overwritten from ``seed`` by init_weights).
    with torch.random.fork_rng(devices=[]):
        net = SplitNet(spec)
    return init_weights(net, torch.Generator().manual_seed(seed))


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Predicted labels for float images [N, 1, 28, 28]."""
    model.eval()
    return torch.cat([model(images[i : i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in [0, 1]."""
    return float((predict(model, images) == labels).float().mean())
