"""The privacy partition's defence: NoPeek distance correlation and Gaussian noise.

NoPeek (Vepakomma et al. 2020) adds ``alpha * dCor(x, z)`` to the owner's loss, which
pushes the smashed features ``z`` to carry less information about the raw images ``x``.
Distance correlation uses plain (not squared) Euclidean distances (Szekely et al. 2007).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from securemark.errors import ConfigError


@dataclass(frozen=True)
class DefenceConfig:
    """``alpha``: weight of the dCor penalty; ``sigma``: std of the noise added to z before
    sending, relative to the RMS of z (sigma = 1 means a signal-to-noise ratio of 1)."""

    alpha: float = 0.0
    sigma: float = 0.0

    def __post_init__(self) -> None:
        if self.alpha < 0:
            raise ConfigError("defence.alpha", f"must be >= 0, got {self.alpha}")
        if self.sigma < 0:
            raise ConfigError("defence.sigma", f"must be >= 0, got {self.sigma}")

    @property
    def active(self) -> bool:
        return self.alpha > 0 or self.sigma > 0


def _double_centred_distances(a: torch.Tensor) -> torch.Tensor:
    d = torch.cdist(a, a)  # Euclidean, not squared
    return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()


def distance_correlation(x: torch.Tensor, z: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Sample distance correlation between rows of ``x`` [n, ...] and ``z`` [n, ...], in [0, 1].

    Differentiable; O(n^2) memory, meant for batches (n of a few hundred).
    """
    a = _double_centred_distances(x.reshape(len(x), -1).to(torch.float64 if x.dtype == torch.float64 else torch.float32))
    b = _double_centred_distances(z.reshape(len(z), -1).to(a.dtype))
    dcov_xy = (a * b).mean()
    dvar_x, dvar_z = (a * a).mean(), (b * b).mean()
    return torch.sqrt(dcov_xy.clamp_min(0) / (torch.sqrt(dvar_x * dvar_z) + eps))


def add_noise(z: torch.Tensor, sigma: float, generator: torch.Generator | None) -> torch.Tensor:
    """``z`` plus Gaussian noise of std ``sigma`` times the batch's feature RMS.

    The noise is relative to the signal (the RMS is taken without gradient): with a
    fixed absolute std, the client would learn to scale its features up and drown the
    noise, and the defence would vanish during training.
    """
    if sigma <= 0:
        return z
    rms = z.detach().pow(2).mean().sqrt()
    return z + sigma * rms * torch.randn(z.shape, generator=generator, dtype=z.dtype)
