"""The only things that cross the boundary between a data owner and the vendor.

An owner sends a :class:`SmashedBatch` (features at the cut, labels); the vendor
answers with a :class:`GradientReply` (dL/dfeatures). :func:`check_smashed` is the
vendor's gate: it accepts float feature tensors of exactly the cut shape and rejects
anything else, so a raw image cannot be sent by mistake.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from securemark.errors import SecureMarkError


class MessageRejected(SecureMarkError):
    """The server refused a message (wrong shape, dtype, labels or values)."""


@dataclass(frozen=True)
class SmashedBatch:
    """Owner -> vendor: ``features`` float32 [B, C, H, W] at the cut, ``labels`` int64 [B]."""

    owner: int
    features: torch.Tensor
    labels: torch.Tensor


@dataclass(frozen=True)
class GradientReply:
    """Vendor -> owner: ``grad`` = dL/dfeatures, same shape as the features sent."""

    grad: torch.Tensor
    loss: float


def check_smashed(msg: SmashedBatch, cut_shape: tuple[int, ...], num_classes: int) -> None:
    """Raise :class:`MessageRejected` unless ``msg`` is a well-formed batch of smashed features."""
    f, y = msg.features, msg.labels
    if not isinstance(f, torch.Tensor) or f.ndim != 1 + len(cut_shape) or tuple(f.shape[1:]) != tuple(cut_shape):
        shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
        raise MessageRejected(f"owner {msg.owner}: features must have shape [B, {', '.join(map(str, cut_shape))}], got {shape}")
    if f.dtype != torch.float32:
        raise MessageRejected(f"owner {msg.owner}: features must be float32, got {f.dtype}")
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or tuple(y.shape) != (f.shape[0],):
        raise MessageRejected(f"owner {msg.owner}: labels must be int64 [{f.shape[0]}]")
    if f.shape[0] == 0:
        raise MessageRejected(f"owner {msg.owner}: empty batch")
    if y.min() < 0 or y.max() >= num_classes:
        raise MessageRejected(f"owner {msg.owner}: labels outside 0..{num_classes - 1}")
    if not torch.isfinite(f).all():
        raise MessageRejected(f"owner {msg.owner}: features contain NaN or Inf")
