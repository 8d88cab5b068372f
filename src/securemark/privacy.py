"""Leakage audit: how well can a curious vendor rebuild owners' images from what it saw?

The vendor is honest-but-curious and *adaptive*: it knows the trained client and the
defence (noise included), passes its own public ``aux`` images through them, and trains
a decoder ``z -> x``. It then decodes the features the owners actually sent. We report
SSIM and PSNR (images in [0, 1]) between owner images and reconstructions, and the
distance correlation between images and features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from securemark.model import IMAGE_SIZE
from securemark.split.defence import add_noise, distance_correlation


@dataclass(frozen=True)
class AuditConfig:
    decoder_epochs: int = 15
    batch_size: int = 128
    lr: float = 1e-3
    sample: int = 500  # owner images scored
    seed: int = 0


class Decoder(nn.Module):
    """Transposed convolutions from the cut shape (C, H, W) back to [1, 28, 28] in [0, 1]."""

    def __init__(self, cut_shape: tuple[int, int, int], width: int = 32) -> None:
        super().__init__()
        c, h, _ = cut_shape
        layers: list[nn.Module] = [nn.Conv2d(c, width, 3, padding=1), nn.ReLU()]
        while h < IMAGE_SIZE:
            layers += [nn.ConvTranspose2d(width, width // 2, 4, stride=2, padding=1), nn.ReLU()]
            width, h = width // 2, h * 2
        layers += [nn.Conv2d(width, 1, 3, padding=1)]
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.body(z)
        if x.shape[-1] != IMAGE_SIZE:
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
        return torch.sigmoid(x)


@torch.no_grad()
def smash(client: nn.Module, images: torch.Tensor, sigma: float, generator: torch.Generator, batch: int = 1000) -> torch.Tensor:
    """Features as the server would receive them: client output plus the defence's noise."""
    client.eval()
    return torch.cat([add_noise(client(images[i : i + batch]), sigma, generator) for i in range(0, len(images), batch)])


def train_decoder(features: torch.Tensor, images: torch.Tensor, cfg: AuditConfig, progress=None) -> Decoder:
    """Fit a decoder on (features, images) pairs of the vendor's own data (MSE)."""
    g = torch.Generator().manual_seed(cfg.seed)
    decoder = Decoder(tuple(features.shape[1:]))
    opt = torch.optim.Adam(decoder.parameters(), lr=cfg.lr)
    decoder.train()
    for _ in progress(range(cfg.decoder_epochs)) if progress else range(cfg.decoder_epochs):
        for idx in torch.randperm(len(images), generator=g).split(cfg.batch_size):
            loss = F.mse_loss(decoder(features[idx]), images[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return decoder.eval()


@torch.no_grad()
def reconstruction_scores(decoder: Decoder, features: torch.Tensor, originals: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
    """SSIM, PSNR (data range 1) and dCor on a sample; returns scores and reconstructions."""
    recon = decoder(features)
    scores = {
        "ssim": float(structural_similarity_index_measure(recon, originals, data_range=1.0)),
        "psnr": float(peak_signal_noise_ratio(recon, originals, data_range=1.0)),
        "dcor": float(distance_correlation(originals.double(), features.double())),
    }
    return scores, recon
