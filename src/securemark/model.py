"""The classifier, built in two parts: ``server(client(x))``.

``client`` is the privacy partition (the first conv blocks, run by each data owner,
optionally ending in a narrow dense *bottleneck*, ``client.neck``); ``server`` is the
rest (run by the vendor): the remaining conv blocks, then dense (fully connected)
blocks, then the linear head. Parameter names are stable and
readable, e.g. ``client.block1.conv.weight``, ``server.block2.bn.running_var``,
``server.dense1.linear.weight``, ``server.fc.weight``; the full model saves and loads
as one state dict.

Every conv block is ``conv 3x3 -> [batch norm] -> ReLU -> max-pool 2x2`` and every dense
block ``linear -> [batch norm] -> ReLU -> dropout``: one parameterised layer per block
(a *unit* in :mod:`securemark.alignment`), so that re-alignment and the fingerprint
read one layer at a time. With ``norm: batch`` the conv and linear layers of the blocks
have no bias (the norm's shift replaces it); :func:`fold_batchnorm` turns such a model
into the norm-free model that computes the same function in evaluation mode.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from securemark.errors import ConfigError

IMAGE_SIZE = 28
NUM_CLASSES = 10
NORMS = ("batch", "none")


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of the classifier.

    Attributes:
        widths: channels of each conv block (each halves the image: at most 4 blocks).
        hidden: units of each dense block between the conv blocks and the head.
        cut: conv blocks in the client (the privacy partition, run by the data owners).
        norm: ``batch`` (batch norm after every conv/linear layer of a block) or ``none``.
        dropout: dropout probability after every dense block (training only).
    """

    widths: tuple[int, ...] = (32, 64)
    hidden: tuple[int, ...] = (256,)
    cut: int = 1
    norm: str = "batch"
    dropout: float = 0.4
    bottleneck: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if not self.widths or any(w < 1 for w in self.widths):
            raise ConfigError("model.widths", f"need one or more positive widths, got {list(self.widths)}")
        if len(self.widths) > 4:
            raise ConfigError("model.widths", "at most 4 blocks fit a 28x28 image (each halves it)")
        if any(h < 1 for h in self.hidden):
            raise ConfigError("model.hidden", f"dense block sizes must be positive, got {list(self.hidden)}")
        if not 1 <= self.cut <= len(self.widths):
            raise ConfigError("model.cut", f"must be between 1 and {len(self.widths)} (client needs a block), got {self.cut}")
        if self.norm not in NORMS:
            raise ConfigError("model.norm", f"must be one of {list(NORMS)}, got {self.norm!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError("model.dropout", f"must be in [0, 1), got {self.dropout}")
        if isinstance(self.bottleneck, bool) or not isinstance(self.bottleneck, int) or self.bottleneck < 0:
            raise ConfigError("model.bottleneck", f"must be an integer >= 0 (0: none), got {self.bottleneck!r}")
        if self.bottleneck and self.cut != len(self.widths):
            raise ConfigError("model.bottleneck", f"a bottleneck ends the client after every conv block: set model.cut to {len(self.widths)}, got {self.cut}")

    @property
    def normed(self) -> bool:
        return self.norm == "batch"

    def spatial(self, blocks: int) -> int:
        size = IMAGE_SIZE
        for _ in range(blocks):
            size //= 2
        return size

    @property
    def cut_shape(self) -> tuple[int, ...]:
        """Shape of what crosses the boundary for one image: (C, H, W) of the feature map
        after the client's conv blocks, or (bottleneck,) when the client ends in one."""
        if self.bottleneck:
            return (self.bottleneck,)
        s = self.spatial(self.cut)
        return (self.widths[self.cut - 1], s, s)

    @property
    def conv_features(self) -> int:
        """The last conv block's output, flattened."""
        s = self.spatial(len(self.widths))
        return self.widths[-1] * s * s

    @property
    def flat_features(self) -> int:
        """Inputs of the server's first dense layer (or of the head): the bottleneck's
        width, else the last conv block flattened."""
        return self.bottleneck or self.conv_features

    @property
    def client_units(self) -> int:
        """Parameterised blocks in the client: its conv blocks, plus the bottleneck."""
        return self.cut + (1 if self.bottleneck else 0)

    def to_dict(self) -> dict:
        out = {"widths": list(self.widths), "hidden": list(self.hidden), "cut": self.cut, "norm": self.norm, "dropout": self.dropout}
        if self.bottleneck:  # absent when off: specs saved before the option read back unchanged
            out["bottleneck"] = self.bottleneck
        return out


class MaxPool2x2(nn.MaxPool2d):
    """``nn.MaxPool2d(2)`` whose forward, where no gradient is taken, is the maximum of the
    four strided slices of every 2 x 2 window: the same values (a maximum is exact; NaN
    propagates in both), 5-9x faster on this CPU than ``max_pool2d``'s channels-first
    kernel, which made pooling as slow as the convolution before it in every evaluation
    (benchmarks/pool_speed.py). With a gradient, ``max_pool2d`` itself runs, so training
    (its backward and its tie-breaking) is unchanged."""

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2  # an odd row or column is dropped, as max_pool2d does
        x = x[:, :, :h, :w]
        return torch.maximum(torch.maximum(x[:, :, 0::2, 0::2], x[:, :, 0::2, 1::2]), torch.maximum(x[:, :, 1::2, 0::2], x[:, :, 1::2, 1::2]))


class ConvBlock(nn.Sequential):
    """``conv 3x3 (pad 1) -> [BatchNorm2d] -> ReLU -> MaxPool 2x2``."""

    def __init__(self, c_in: int, c_out: int, normed: bool) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict(conv=nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=not normed))
        if normed:
            layers["bn"] = nn.BatchNorm2d(c_out)
        layers["relu"] = nn.ReLU()
        layers["pool"] = MaxPool2x2()
        super().__init__(layers)

    @property
    def layer(self) -> nn.Conv2d:
        return self.conv

    def pre_pool(self, x: torch.Tensor) -> torch.Tensor:
        """The block's post-ReLU output before pooling (what alignment compares)."""
        return self.relu(self.bn(self.conv(x)) if hasattr(self, "bn") else self.conv(x))


class DenseBlock(nn.Sequential):
    """``linear -> [BatchNorm1d] -> ReLU -> Dropout``."""

    def __init__(self, n_in: int, n_out: int, normed: bool, dropout: float) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict(linear=nn.Linear(n_in, n_out, bias=not normed))
        if normed:
            layers["bn"] = nn.BatchNorm1d(n_out)
        layers["relu"] = nn.ReLU()
        layers["drop"] = nn.Dropout(dropout)
        super().__init__(layers)

    @property
    def layer(self) -> nn.Linear:
        return self.linear

    def pre_pool(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.linear(x)) if hasattr(self, "bn") else self.linear(x))


def build_client(spec: ModelSpec) -> nn.Sequential:
    channels = (1, *spec.widths)
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        (f"block{i + 1}", ConvBlock(channels[i], channels[i + 1], spec.normed)) for i in range(spec.cut))
    if spec.bottleneck:
        layers["flatten"] = nn.Flatten()
        layers["neck"] = DenseBlock(spec.conv_features, spec.bottleneck, spec.normed, dropout=0.0)
    return nn.Sequential(layers)


def build_server(spec: ModelSpec) -> nn.Sequential:
    channels = (1, *spec.widths)
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        (f"block{i + 1}", ConvBlock(channels[i], channels[i + 1], spec.normed)) for i in range(spec.cut, len(spec.widths))
    )
    layers["flatten"] = nn.Flatten()
    sizes = (spec.flat_features, *spec.hidden)
    for i in range(len(spec.hidden)):
        layers[f"dense{i + 1}"] = DenseBlock(sizes[i], sizes[i + 1], spec.normed, spec.dropout)
    layers["fc"] = nn.Linear(sizes[-1], NUM_CLASSES)
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
    global RNG), so that initial weights are a function of the seed alone. Batch norms
    start as the identity (weight 1, bias 0, running mean 0, variance 1)."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            if module.bias is not None:
                fan_in = module.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            module.reset_parameters()
    return model


def build_model(spec: ModelSpec, seed: int) -> SplitNet:
    """A freshly initialised model whose weights depend only on ``seed``."""
    # nn.Conv2d/nn.Linear draw default weights from the global generator while they are
    # built; fork it so the caller's RNG stream is left as it was (weights are then
    # overwritten from ``seed`` by init_weights).
    with torch.random.fork_rng(devices=[]):
        net = SplitNet(spec)
    return init_weights(net, torch.Generator().manual_seed(seed))


def units(model: SplitNet) -> list[tuple[str, nn.Module]]:
    """The blocks with one parameterised layer each (conv blocks, then dense blocks), in
    forward order, as ``(path, block)``; the head ``server.fc`` follows the last one."""
    return [(f"{part}.{name}", block) for part in ("client", "server")
            for name, block in getattr(model, part).named_children() if isinstance(block, (ConvBlock, DenseBlock))]


def norm_scale(block: nn.Module) -> torch.Tensor | None:
    """``gamma / sqrt(running_var + eps)`` of the block's batch norm (None without one):
    in evaluation mode the norm multiplies the layer's output channel c by this."""
    bn = getattr(block, "bn", None)
    if bn is None:
        return None
    return bn.weight / torch.sqrt(bn.running_var + bn.eps)


@torch.no_grad()
def fold_batchnorm(model: SplitNet) -> SplitNet:
    """The norm-free model (``norm: none``) that computes what ``model`` computes in
    evaluation mode: each batch norm is folded into the layer before it,
    ``w' = w * gamma / sqrt(var + eps)`` per output channel and
    ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``. A model without norms is copied."""
    if not model.spec.normed:
        return copy.deepcopy(model).eval()
    spec = replace(model.spec, norm="none")
    out = SplitNet(spec)
    source, target = dict(units(model)), dict(units(out))
    for path, block in source.items():
        layer, folded = block.layer, target[path].layer
        scale = norm_scale(block)
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        bias = layer.bias if layer.bias is not None else torch.zeros(layer.weight.shape[0])
        folded.weight.copy_(layer.weight * scale.view(shape))
        folded.bias.copy_((bias - block.bn.running_mean) * scale + block.bn.bias)
    out.server.fc.load_state_dict(model.server.fc.state_dict())
    return out.eval()


def unit_index(model: SplitNet, path: str) -> int:
    """Position of the unit ``path`` (e.g. ``server.dense1``) among :func:`units`."""
    paths = [p for p, _ in units(model)]
    if path not in paths:
        raise ConfigError("fingerprint.layer", f"{path!r} is not a conv or dense block; blocks: {paths}")
    return paths.index(path)


def server_inputs_of(model: SplitNet, index: int, features: torch.Tensor) -> torch.Tensor:
    """What the server's unit ``index`` reads when the client sent ``features`` (its
    output at the cut): the server's earlier units applied (flattened for a dense unit)."""
    x = features
    for i, (_, block) in enumerate(units(model)):
        if i < model.spec.client_units:
            continue
        if not isinstance(block, ConvBlock) and x.dim() > 2:
            x = x.flatten(1)
        if i == index:
            return x
        x = block(x)
    raise IndexError(f"unit {index} is not in the server")


def forward_from(model: SplitNet, index: int, x: torch.Tensor) -> torch.Tensor:
    """Logits from the input ``x`` of unit ``index``: that unit, the ones after it, the head."""
    for i, (_, block) in enumerate(units(model)):
        if i < index:
            continue
        if not isinstance(block, ConvBlock) and x.dim() > 2:
            x = x.flatten(1)
        x = block(x)
    return model.server.fc(x.flatten(1) if x.dim() > 2 else x)


@torch.no_grad()
def unit_inputs(model: SplitNet, index: int, images: torch.Tensor) -> torch.Tensor:
    """What the layer of unit ``index`` reads, one row per application of the layer:
    its 3x3 input patches for a conv block (``[N * H * W, C_in * 9]``, in the layout of
    ``conv.weight.flatten(1)``), its input vectors for a dense block (``[N, fan_in]``).
    The model runs in evaluation mode."""
    model.eval()
    x = images
    for i, (_, block) in enumerate(units(model)):
        if not isinstance(block, ConvBlock) and x.dim() > 2:
            x = x.flatten(1)
        if i == index:
            if isinstance(block, ConvBlock):
                patches = F.unfold(x, kernel_size=3, padding=1)  # [N, C_in * 9, H * W]
                return patches.transpose(1, 2).reshape(-1, patches.shape[1])
            return x
        x = block(x)
    raise IndexError(index)


def input_covariance(model: SplitNet, index: int, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Centred covariance (float64 ``[fan_in, fan_in]``) of what unit ``index``'s layer
    reads on ``images``: how strongly the data excites each direction of its weight rows."""
    total, outer, count = None, None, 0
    for i in range(0, len(images), batch):
        rows = unit_inputs(model, index, images[i : i + batch]).to(torch.float64)
        total = rows.sum(0) if total is None else total + rows.sum(0)
        outer = rows.T @ rows if outer is None else outer + rows.T @ rows
        count += len(rows)
    mean = total / count
    return outer / count - torch.outer(mean, mean)


def matrix_sqrt(covariance: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a covariance matrix (negative rounding noise clipped)."""
    eigenvalues, vectors = torch.linalg.eigh(covariance)
    return (vectors * eigenvalues.clamp_min(0).sqrt()) @ vectors.T


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Predicted labels for float images [N, 1, 28, 28]."""
    model.eval()
    return torch.cat([model(images[i : i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in [0, 1]."""
    return float((predict(model, images) == labels).float().mean())
