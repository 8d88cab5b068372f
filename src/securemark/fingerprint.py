"""Embedding a customer's code word into the server part of the model, and reading it back.

The key ``K`` (code_length x n, from :mod:`securemark.key`) projects the full flattened
weight of one server layer to soft values ``y = K w``. Bit ``b_i`` is carried by the
sign of ``y_i``: ``s_i = 2 b_i - 1``. Embedding fine-tunes only server layers on the
vendor's feature bank (smashed features it already holds, so no raw image is needed)
with ``CE + lambda * mean(hinge(margin - s_i * y_i))``, until every bit sits on its side
with the margin and bank accuracy is within tolerance of the base model's.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from securemark.errors import ConfigError, InvalidConfig, InvalidInput, SecureMarkError
from securemark.model import ConvBlock, SplitNet, norm_scale, units


class EmbeddingFailed(SecureMarkError):
    """The step budget ran out before the code word was embedded within tolerance.

    ``model`` is the partly trained copy (never to be delivered; an attacker may keep it)."""

    def __init__(self, message: str, model: SplitNet | None = None, steps: int = 0) -> None:
        super().__init__(message)
        self.model = model
        self.steps = steps


@dataclass(frozen=True)
class EmbedConfig:
    layer: str = "server.block2.conv.weight"  # parameter that carries the code word
    lam: float = 1.0            # weight of the hinge term
    margin: float = 0.05        # required s_i * y_i for every bit (the stop criterion)
    slack: float = 0.2          # the hinge aims at margin * (1 + slack), so bits clear it
    lr: float = 1e-3
    batch_size: int = 256
    max_steps: int = 2000       # fail loudly after this many steps
    check_every: int = 25
    accuracy_tolerance: float = 0.003  # allowed drop of bank accuracy (fraction)
    eval_rows: int = 5000       # bank rows used to check accuracy

    def __post_init__(self) -> None:
        for key in ("lam", "margin", "lr"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"fingerprint.{key}", f"must be > 0, got {getattr(self, key)}")
        for key in ("max_steps", "check_every", "batch_size", "eval_rows"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"fingerprint.{key}", f"must be a positive integer, got {getattr(self, key)}")
        for key in ("accuracy_tolerance", "slack"):
            if getattr(self, key) < 0:
                raise ConfigError(f"fingerprint.{key}", f"must be >= 0, got {getattr(self, key)}")
        if not self.layer.startswith("server."):
            raise ConfigError("fingerprint.layer", f"must be a server parameter (the vendor's half), got {self.layer!r}")


@dataclass(frozen=True)
class EmbedResult:
    model: SplitNet
    steps: int
    ber: float
    min_margin: float        # min_i s_i * y_i (>= margin when embedded)
    bank_accuracy: float
    base_bank_accuracy: float
    seconds: float


def fingerprint_unit(model: SplitNet, layer: str) -> nn.Module:
    """The block whose layer weight ``layer`` names (``server.block2.conv.weight`` ->
    the block ``server.block2``); only the weight of a unit's layer can carry a code word."""
    blocks = dict(units(model))
    path, _, leaf = layer.rpartition(".")
    block_path, _, layer_name = path.rpartition(".")
    if leaf != "weight" or block_path not in blocks or layer_name not in ("conv", "linear"):
        valid = [f"{p}.{'conv' if isinstance(b, ConvBlock) else 'linear'}.weight" for p, b in blocks.items()]
        raise InvalidConfig(f"fingerprint layer {layer!r} is not the weight of a conv or dense block; choose one of {valid}")
    return blocks[block_path]


def effective_weight(model: SplitNet, layer: str) -> torch.Tensor:
    """The weight of ``layer`` as the model applies it in evaluation mode: with a batch
    norm after it, each output channel times ``gamma / sqrt(running_var + eps)``
    (the weight :func:`~securemark.model.fold_batchnorm` writes). Differentiable in the
    layer's weight and the norm's gamma; the fingerprint lives in this weight, so
    splitting a scale between layer and norm cannot hide it."""
    block = fingerprint_unit(model, layer)
    weight = block.layer.weight
    scale = norm_scale(block)
    if scale is None:
        return weight
    return weight * scale.view((-1,) + (1,) * (weight.dim() - 1))


def extract(model: SplitNet, layer: str, key_matrix: torch.Tensor) -> torch.Tensor:
    """Soft values y = K w (float64 [code_length]) of the effective weight of ``layer``."""
    with torch.no_grad():
        w = effective_weight(model, layer).detach().reshape(-1).to(torch.float64)
    if w.numel() != key_matrix.shape[1]:
        raise InvalidInput(f"layer {layer!r} has {w.numel()} weights, key expects {key_matrix.shape[1]}")
    return key_matrix.to(torch.float64) @ w


def signs(bits: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(2.0 * np.asarray(bits, dtype=np.float32) - 1.0)


def bit_error_rate(y: torch.Tensor, bits: np.ndarray) -> float:
    """Fraction of bits whose extracted sign differs from the code word."""
    return float(((y > 0).numpy().astype(np.uint8) != np.asarray(bits, dtype=np.uint8)).mean())


@torch.no_grad()
def bank_accuracy(model: SplitNet, features: torch.Tensor, labels: torch.Tensor) -> float:
    model.server.eval()
    correct = sum(int((model.server(features[i : i + 2048].float()).argmax(1) == labels[i : i + 2048]).sum()) for i in range(0, len(labels), 2048))
    return correct / max(len(labels), 1)


def embed(
    base: SplitNet,
    bits: np.ndarray,
    key_matrix: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    cfg: EmbedConfig,
    generator: torch.Generator,
) -> EmbedResult:
    """A fingerprinted copy of ``base`` carrying ``bits``; ``base`` is not modified.

    ``features`` [N, C, H, W] and ``labels`` [N] are the feature bank (the server's own
    records); only server parameters are trained.
    """
    start = time.perf_counter()
    model = copy.deepcopy(base).eval()  # evaluation mode throughout: batch-norm statistics stay the base's
    for p in model.client.parameters():
        p.requires_grad_(False)
    fingerprint_unit(model, cfg.layer)
    K = key_matrix.to(torch.float32)
    s = signs(bits)
    if s.numel() != K.shape[0]:
        raise InvalidInput(f"code word has {s.numel()} bits, key has {K.shape[0]} rows")
    eval_idx = torch.randperm(len(labels), generator=generator)[: cfg.eval_rows]
    eval_x, eval_y = features[eval_idx].float(), labels[eval_idx]
    base_acc = bank_accuracy(model, eval_x, eval_y)
    optimizer = torch.optim.Adam(model.server.parameters(), lr=cfg.lr)
    steps = 0
    while True:
        if steps % cfg.check_every == 0 or steps >= cfg.max_steps:
            with torch.no_grad():
                y = K @ effective_weight(model, cfg.layer).reshape(-1)
                min_margin = float((s * y).min())
            if min_margin >= cfg.margin:
                acc = bank_accuracy(model, eval_x, eval_y)
                if acc >= base_acc - cfg.accuracy_tolerance:
                    break
            if steps >= cfg.max_steps:
                raise EmbeddingFailed(
                    f"code word not embedded after {steps} steps: min margin {min_margin:.4f} "
                    f"(need {cfg.margin}); raise fingerprint.max_steps or fingerprint.lam",
                    model=model.eval(),
                    steps=steps,
                )
        idx = torch.randint(len(labels), (cfg.batch_size,), generator=generator)
        ce = F.cross_entropy(model.server(features[idx].float()), labels[idx])
        hinge = F.relu(cfg.margin * (1 + cfg.slack) - s * (K @ effective_weight(model, cfg.layer).reshape(-1))).mean()
        loss = ce + cfg.lam * hinge
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    y = extract(model, cfg.layer, K)
    return EmbedResult(model, steps, bit_error_rate(y, bits), float((s.double() * y).min()), acc, base_acc, time.perf_counter() - start)
