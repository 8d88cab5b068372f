"""The privacy partition's defence: NoPeek distance correlation, Gaussian noise and a
simulated attacker.

NoPeek (Vepakomma et al. 2020) adds ``alpha * dCor(x, z)`` to the owner's loss, which
pushes the smashed features ``z`` to carry less information about the raw images ``x``.
Distance correlation uses plain (not squared) Euclidean distances (Szekely et al. 2007).
Attacker-aware training (as in ResSFL, Li et al. 2022): each owner trains its own
label-conditioned decoder on the features it sends and adds
``adversary * max(SSIM(decoder(z), x) - tau, 0)`` to its loss
(:class:`securemark.split.parties.DataOwner`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from securemark.errors import ConfigError


@dataclass(frozen=True)
class DefenceConfig:
    """``alpha``: weight of the dCor penalty; ``sigma``: std of the noise added to z before
    sending, relative to the RMS of z (sigma = 1 means a signal-to-noise ratio of 1);
    ``adversary``: weight of the simulated attacker's SSIM above ``tau``;
    ``simulator_width``: width of that attacker's decoder."""

    alpha: float = 0.0
    sigma: float = 0.0
    adversary: float = 0.0
    tau: float = 0.5
    simulator_width: int = 16

    def __post_init__(self) -> None:
        for key in ("alpha", "sigma", "adversary"):
            if not getattr(self, key) >= 0:
                raise ConfigError(f"defence.{key}", f"must be >= 0, got {getattr(self, key)}")
        if not 0.0 <= self.tau < 1.0:
            raise ConfigError("defence.tau", f"must be in [0, 1), got {self.tau}")
        if not (isinstance(self.simulator_width, int) and self.simulator_width >= 4):
            raise ConfigError("defence.simulator_width", f"must be an integer >= 4, got {self.simulator_width!r}")

    @property
    def active(self) -> bool:
        return self.alpha > 0 or self.sigma > 0 or self.adversary > 0


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
