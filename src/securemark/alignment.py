"""Re-alignment of a suspicious model to the vendor's base model, before extraction.

Two re-parametrisations change a SplitNet's weights without changing its function:

- **permutation**: reorder the output channels of a conv block (weights and bias) and
  the next layer's input channels (the next conv's ``[:, c]`` slices, or the linear
  head's columns, which the flatten groups by channel: ``c * H * W + h * W + w``);
- **positive rescaling**: multiply channel c of a block by ``a > 0`` and divide the next
  layer's input channel c by ``a`` (ReLU and max-pool commute with positive scaling).

Either one scrambles ``w`` of the fingerprinted layer (a permuted client layer permutes
its input channels, a permuted server layer its rows), so projecting the raw weights
reads noise. :func:`align` undoes both, block by block in forward order: it runs a fixed
probe batch through the base model and the suspect, matches every base channel to the
suspect channel whose post-ReLU activations correlate best (Hungarian matching,
``scipy.optimize.linear_sum_assignment``; correlation is blind to positive scale),
helped by the cosine of the channels' weights, estimates the scale from weight norms
(see :func:`align`), and writes the inverse into the suspect. A re-parametrised copy of a model thus aligns to the same
weights as the model itself (up to float rounding).

Alignment depends only on the suspect, the base model and the probe images, never on a
code word, so an innocent customer's code word stays independent of the extracted
``y`` and the distribution-free threshold of :mod:`securemark.scoring` still holds.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from securemark.errors import InvalidInput
from securemark.model import SplitNet

__all__ = ["BlockAlignment", "Alignment", "conv_blocks", "permute_channels", "scale_channels", "align"]


@dataclass(frozen=True)
class BlockAlignment:
    """How one conv block of the suspect maps onto the base model's.

    Attributes:
        block: the block's module path, e.g. ``client.block1``.
        permutation: int [C]; base channel j is played by suspect channel ``permutation[j]``.
        scales: float [C]; that suspect channel's activations are ``scales[j]`` times
            the base channel's (RMS ratio over the probe batch).
        correlation: float [C]; mean similarity (activation correlation and weight
            cosines) of each matched pair: 1.0 for a pure re-parametrisation of the
            reference, lower after fine-tuning or the vendor's embedding.
    """

    block: str
    permutation: np.ndarray
    scales: np.ndarray
    correlation: np.ndarray

    @property
    def is_identity(self) -> bool:
        return bool((self.permutation == np.arange(len(self.permutation))).all())


@dataclass(frozen=True)
class Alignment:
    """The aligned model (a new SplitNet; the suspect is unchanged) and what was undone."""

    model: SplitNet
    blocks: tuple[BlockAlignment, ...]

    def summary(self) -> dict:
        """JSON-ready: per block, channels moved, scale range and the weakest match."""
        return {
            b.block: {
                "channels_moved": int((b.permutation != np.arange(len(b.permutation))).sum()),
                "scale_min": float(b.scales.min()),
                "scale_max": float(b.scales.max()),
                "min_similarity": float(b.correlation.min()),
            }
            for b in self.blocks
        }


def conv_blocks(model: SplitNet) -> list[tuple[str, nn.Module]]:
    """The conv blocks in forward order (client first), as ``(path, block)``."""
    return [(f"{part}.{name}", block) for part in ("client", "server")
            for name, block in getattr(model, part).named_children() if hasattr(block, "conv")]


def _next_layer(model: SplitNet, index: int) -> nn.Module:
    blocks = conv_blocks(model)
    return blocks[index + 1][1].conv if index + 1 < len(blocks) else model.server.fc


@torch.no_grad()
def permute_channels(model: SplitNet, index: int, permutation: torch.Tensor | np.ndarray) -> None:
    """In place: new channel j of conv block ``index`` is old channel ``permutation[j]``;
    the next layer's inputs follow, so the function is unchanged."""
    perm = torch.as_tensor(np.asarray(permutation), dtype=torch.long)
    conv = conv_blocks(model)[index][1].conv
    conv.weight.copy_(conv.weight[perm])
    conv.bias.copy_(conv.bias[perm])
    nxt = _next_layer(model, index)
    if isinstance(nxt, nn.Conv2d):
        nxt.weight.copy_(nxt.weight[:, perm])
    else:  # the linear head: columns grouped by channel (flatten of [C, H, W])
        out_features, channels = nxt.weight.shape[0], conv.weight.shape[0]
        grouped = nxt.weight.view(out_features, channels, -1)
        nxt.weight.copy_(grouped[:, perm].reshape(out_features, -1))


@torch.no_grad()
def scale_channels(model: SplitNet, index: int, scales: torch.Tensor | np.ndarray) -> None:
    """In place: multiply channel c of conv block ``index`` by ``scales[c] > 0`` and divide
    the next layer's input channel c by it, so the function is unchanged."""
    conv = conv_blocks(model)[index][1].conv
    s = torch.as_tensor(np.asarray(scales), dtype=conv.weight.dtype)
    if s.shape != (conv.weight.shape[0],) or not bool((s > 0).all()) or not bool(torch.isfinite(s).all()):
        raise InvalidInput(f"scales must be {conv.weight.shape[0]} finite positive numbers")
    conv.weight.mul_(s.view(-1, 1, 1, 1))
    conv.bias.mul_(s)
    nxt = _next_layer(model, index)
    if isinstance(nxt, nn.Conv2d):
        nxt.weight.div_(s.view(1, -1, 1, 1))
    else:
        out_features = nxt.weight.shape[0]
        nxt.weight.copy_((nxt.weight.view(out_features, len(s), -1) / s.view(1, -1, 1)).reshape(out_features, -1))


@torch.no_grad()
def _activations(model: SplitNet, index: int, probe: torch.Tensor) -> torch.Tensor:
    """Post-ReLU outputs of conv block ``index`` on the probe, as [C, N*H*W] float64."""
    x = probe
    for i, (_, block) in enumerate(conv_blocks(model)):
        a = block.relu(block.conv(x))
        if i == index:
            return a.transpose(0, 1).reshape(a.shape[1], -1).to(torch.float64)
        x = block.pool(a)
    raise IndexError(index)


def _rows_in(model: SplitNet, index: int) -> torch.Tensor:
    """Incoming weights of each channel of block ``index`` (kernel and bias), [C, fan_in + 1]."""
    conv = conv_blocks(model)[index][1].conv
    return torch.cat([conv.weight.flatten(1), conv.bias[:, None]], 1).detach().to(torch.float64)


def _columns_out(model: SplitNet) -> torch.Tensor:
    """The linear head's weights grouped by input channel of the last block, [C, classes * H * W]."""
    fc, channels = model.server.fc, conv_blocks(model)[-1][1].conv.out_channels
    return fc.weight.detach().view(fc.out_features, channels, -1).transpose(0, 1).reshape(channels, -1).to(torch.float64)


def _similarity(a: torch.Tensor, b: torch.Tensor, centre: bool) -> np.ndarray:
    """Correlation (``centre``) or cosine of every row of ``a`` with every row of ``b``;
    0 where a row is constant. Both are blind to positive scaling of a row."""
    if centre:
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    sim = (a @ b.T) / (a.norm(dim=1)[:, None] * b.norm(dim=1)[None, :])
    return torch.nan_to_num(sim, nan=0.0, posinf=0.0, neginf=0.0).numpy()


def _ratio(num: torch.Tensor, den: torch.Tensor) -> np.ndarray:
    num, den = num.numpy(), den.numpy()
    valid = (num > 0) & (den > 0)
    return np.where(valid, num / np.where(valid, den, 1.0), 1.0)


@torch.no_grad()
def align(suspect: SplitNet, reference: SplitNet, probe: torch.Tensor) -> Alignment:
    """Undo channel permutations and positive rescalings of ``suspect`` relative to
    ``reference`` (the base model), block by block; returns a new, aligned model.

    For each block (the earlier ones already aligned), channel j of the reference is
    matched to suspect channel k by maximising, over permutations, the sum of
    similarities: activation correlation on the probe, cosine of the incoming weights,
    and for the last block the cosine of the linear head's columns (its outputs are
    classes, never permuted). Dead channels (no activation) are matched on weights.
    The scale is the ratio of incoming-weight norms; for the last block, the geometric
    mean of that and the inverse ratio of head-column norms, which stays near 1 when the
    vendor's embedding moved a channel's weights (it changes both sides alike).

    Args:
        suspect: the model to align (same architecture as ``reference``; not modified).
        reference: the vendor's base model.
        probe: float [N, 1, 28, 28], a fixed batch of the vendor's images; a few hundred
            are plenty (the match uses every pixel position of every image).
    """
    if not isinstance(probe, torch.Tensor) or probe.dim() != 4 or probe.shape[0] == 0:
        raise InvalidInput(f"probe must be a non-empty float tensor [N, 1, 28, 28], got {getattr(probe, 'shape', type(probe))}")
    model = copy.deepcopy(suspect).cpu().eval()
    reference = reference.cpu().eval()
    probe = probe.to(torch.float32)
    blocks = []
    n_blocks = len(conv_blocks(model))
    for index, (path, _) in enumerate(conv_blocks(model)):
        last = index == n_blocks - 1
        ref_in, sus_in = _rows_in(reference, index), _rows_in(model, index)
        sim = _similarity(_activations(reference, index, probe), _activations(model, index, probe), centre=True)
        sim = sim + _similarity(ref_in, sus_in, centre=False)
        if last:
            ref_out, sus_out = _columns_out(reference), _columns_out(model)
            sim = sim + _similarity(ref_out, sus_out, centre=False)
        rows, cols = linear_sum_assignment(sim, maximize=True)
        perm = cols[np.argsort(rows)]
        scales = _ratio(sus_in[perm].norm(dim=1), ref_in.norm(dim=1))
        if last:
            scales = np.sqrt(scales / _ratio(sus_out[perm].norm(dim=1), ref_out.norm(dim=1)))
        permute_channels(model, index, perm)
        scale_channels(model, index, 1.0 / scales)
        blocks.append(BlockAlignment(path, perm, scales, sim[np.arange(len(perm)), perm] / (3.0 if last else 2.0)))
    return Alignment(model, tuple(blocks))
