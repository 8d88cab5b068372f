"""How much of an owner image a reconstruction gives back, and how much of that the
labels alone would have given.

Scores compare reconstructions with the owner images (both in [0, 1]): SSIM and PSNR
(data range 1) and the distance correlation between images and reconstructions. The
vendor receives every label, so the class-mean ``aux`` image already scores well above
zero: :func:`leakage` is the best attacker's SSIM *beyond* that label-only floor.
"""

from __future__ import annotations

import torch
from torch import nn

from securemark.errors import InvalidInput
from securemark.privacy.defence import add_noise, distance_correlation

FLOOR = "label_floor"


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of image batches in [0, 1] (differentiable). torchmetrics is imported on
    first use: it costs seconds at start-up, and the CLI never needs it."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(a, b, data_range=1.0)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(a, b, data_range=1.0)


@torch.no_grad()
def smash(client: nn.Module, images: torch.Tensor, sigma: float, generator: torch.Generator | None, batch: int = 1000) -> torch.Tensor:
    """Features as the server would receive them: client output plus the defence's noise."""
    client.eval()
    return torch.cat([add_noise(client(images[i : i + batch]), sigma, generator) for i in range(0, len(images), batch)])


@torch.no_grad()
def reconstruction_scores(recon: torch.Tensor, originals: torch.Tensor) -> dict[str, float]:
    """SSIM, PSNR and dCor(originals, reconstructions) of one attacker on the sample."""
    if recon.shape != originals.shape:
        raise InvalidInput(f"reconstructions {tuple(recon.shape)} do not match the originals {tuple(originals.shape)}")
    recon = recon.clamp(0, 1)
    return {
        "ssim": float(ssim(recon, originals)),
        "psnr": float(psnr(recon, originals)),
        "dcor": float(distance_correlation(originals.double(), recon.double())),
    }


@torch.no_grad()
def feature_dcor(originals: torch.Tensor, features: torch.Tensor) -> float:
    """dCor between owner images and the features the server received (attacker-free)."""
    return float(distance_correlation(originals.double(), features.double()))


def leakage(per_attacker: dict[str, dict[str, float]]) -> tuple[float, str]:
    """``max over attackers of SSIM - SSIM of the label-only floor`` and the attacker that
    reached the max (the floor itself when no attacker beats it: leakage 0)."""
    if FLOOR not in per_attacker:
        raise InvalidInput(f"leakage needs the {FLOOR!r} attacker's scores (the label-only baseline)")
    strongest = max(per_attacker, key=lambda name: per_attacker[name]["ssim"])
    return per_attacker[strongest]["ssim"] - per_attacker[FLOOR]["ssim"], strongest
