"""The curious vendor's attacker zoo: ways to rebuild owner images from the features
(and labels) the server received.

The vendor is honest-but-curious and *adaptive*: it holds the trained client it ships,
the defence's noise model, its own ``aux`` images and every label (a
:class:`VendorView`), and never an owner image. Each attacker is a plug-in
(``@register_attacker("name")``), built with its options as keyword arguments, fitted
once on the vendor's view and then asked to reconstruct the received features:

- ``decoder``: transposed convolutions trained with MSE on one noisy pass of ``aux``
  (the audit's original attacker, kept as the weak reference).
- ``strong_decoder``: residual blocks with batch norm, conditioned on the label, MSE
  plus an SSIM term, a cosine schedule, the defence's noise drawn afresh every batch.
- ``inversion``: no training; searches for the image whose client features match the
  received ones under the known client (plus a total-variation prior), starting from
  the class-mean image.
- ``label_floor``: the class-mean ``aux`` image of each label: what the labels alone
  give, the baseline that leakage is measured beyond.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from securemark import checks
from securemark.errors import InvalidInput
from securemark.model import IMAGE_SIZE, NUM_CLASSES
from securemark.privacy.scores import smash, ssim
from securemark.registry import Registry
from securemark.privacy.defence import add_noise

Progress = Callable[[Any], Any]


@dataclass(frozen=True, eq=False)
class VendorView:
    """What the vendor holds when it attacks.

    Attributes:
        client: the trained client (privacy partition) it ships, used frozen.
        sigma: the defence's noise level (std relative to the features' RMS).
        aux: the vendor's own images, float [N, 1, 28, 28] in [0, 1].
        aux_labels: their labels, int64 [N].
    """

    client: nn.Module
    sigma: float
    aux: torch.Tensor
    aux_labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.aux.dim() != 4 or tuple(self.aux.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE) or len(self.aux) != len(self.aux_labels):
            raise InvalidInput(f"aux must be [N, 1, 28, 28] with N labels, got {tuple(self.aux.shape)} and {len(self.aux_labels)} labels")
        self.client.eval()
        for p in self.client.parameters():
            p.requires_grad_(False)

    @property
    def cut_shape(self) -> tuple[int, int, int]:
        with torch.no_grad():
            return tuple(self.client(self.aux[:1]).shape[1:])


class PrivacyAttacker:
    """Base class: ``fit`` on the vendor's view, then ``reconstruct(features, labels)``
    -> images float [N, 1, 28, 28] in [0, 1]."""

    name: ClassVar[str] = ""

    def fit(self, view: VendorView, generator: torch.Generator, progress: Progress | None = None) -> PrivacyAttacker:
        return self

    def reconstruct(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        return dict(self.__dict__)


ATTACKERS: Registry[type[PrivacyAttacker]] = Registry("privacy attacker")
register_attacker = ATTACKERS.register


def create_attacker(name: str, **options: Any) -> PrivacyAttacker:
    """The attacker registered as ``name`` built with ``options`` (checked)."""
    return ATTACKERS.create(name, **options)


def _epochs(progress: Progress | None, epochs: int, name: str) -> Any:
    return progress(range(epochs), name) if progress else range(epochs)


def class_means(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean image per class [NUM_CLASSES, 1, 28, 28]; a class the images lack gets the overall mean."""
    means = images.mean(0, keepdim=True).repeat(NUM_CLASSES, 1, 1, 1)
    for c in labels.unique().tolist():
        means[c] = images[labels == c].mean(0)
    return means


# ----------------------------------------------------------------------------- the floor
@register_attacker("label_floor")
class LabelFloor(PrivacyAttacker):
    """The class-mean ``aux`` image for each label: reads no feature at all."""

    def fit(self, view: VendorView, generator: torch.Generator, progress: Progress | None = None) -> LabelFloor:
        self._means = class_means(view.aux, view.aux_labels)
        return self

    def reconstruct(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self._means[labels]

    def options(self) -> dict[str, Any]:
        return {}


# ----------------------------------------------------------------------------- decoders
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

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return _to_image(self.body(z))


def _to_image(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] != IMAGE_SIZE:
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return torch.sigmoid(x)


class Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class StrongDecoder(nn.Module):
    """Label-conditioned residual decoder: the features plus a learnt label map go
    through ``blocks`` residual blocks at the cut's resolution, then upsampling stages
    (each a transposed conv and a residual block) up to 28 x 28."""

    def __init__(self, cut_shape: tuple[int, int, int], width: int = 64, blocks: int = 2, label_channels: int = 8) -> None:
        super().__init__()
        c, h, _ = cut_shape
        self.label_map = nn.Embedding(NUM_CLASSES, label_channels)
        self.stem = nn.Sequential(nn.Conv2d(c + label_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        body: list[nn.Module] = [Residual(width) for _ in range(blocks)]
        while h < IMAGE_SIZE:
            body += [nn.ConvTranspose2d(width, width // 2, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(width // 2), nn.ReLU(),
                     Residual(width // 2)]
            width, h = width // 2, h * 2
        body += [nn.Conv2d(width, 1, 3, padding=1)]
        self.body = nn.Sequential(*body)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        lab = self.label_map(labels)[:, :, None, None].expand(-1, -1, z.shape[2], z.shape[3])
        return _to_image(self.body(self.stem(torch.cat([z, lab], 1))))


class _TrainedDecoder(PrivacyAttacker):
    """Shared training loop: fit a decoder ``(z, label) -> x`` on the vendor's ``aux``."""

    def __init__(self, epochs: int, batch_size: int = 128, lr: float = 1e-3) -> None:
        checks.integer("privacy_audit.attackers", "epochs", epochs, 1)
        checks.integer("privacy_audit.attackers", "batch_size", batch_size, 1)
        checks.number("privacy_audit.attackers", "lr", lr, 0, low_open=True)
        self.epochs, self.batch_size, self.lr = int(epochs), int(batch_size), float(lr)

    def build(self, cut_shape: tuple[int, int, int]) -> nn.Module:
        raise NotImplementedError

    def loss(self, recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(recon, images)

    def fresh_noise(self) -> bool:
        return False

    def fit(self, view: VendorView, generator: torch.Generator, progress: Progress | None = None) -> _TrainedDecoder:
        self.net = self.build(view.cut_shape)
        clean = smash(view.client, view.aux, 0.0, None)
        fixed = add_noise(clean, view.sigma, generator)  # one noisy pass, unless noise is drawn afresh per batch
        optimizer = torch.optim.Adam(self.net.parameters(), lr=self.lr)
        steps = self.epochs * math.ceil(len(view.aux) / self.batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.lr, total_steps=steps, pct_start=0.1) if self.fresh_noise() else None
        self.net.train()
        for _ in _epochs(progress, self.epochs, self.name):
            for idx in torch.randperm(len(view.aux), generator=generator).split(self.batch_size):
                z = add_noise(clean[idx], view.sigma, generator) if self.fresh_noise() else fixed[idx]
                loss = self.loss(self.net(z, view.aux_labels[idx]), view.aux[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if schedule is not None:
                    schedule.step()
        self.net.eval()
        return self

    @torch.no_grad()
    def reconstruct(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.net(features[i : i + 500].float(), labels[i : i + 500]) for i in range(0, len(labels), 500)])

    def options(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "net"}


@register_attacker("decoder")
class PlainDecoder(_TrainedDecoder):
    """Transposed convolutions, MSE, one noisy pass of ``aux`` (the weak reference)."""

    def __init__(self, epochs: int = 15, batch_size: int = 128, lr: float = 1e-3, width: int = 32) -> None:
        super().__init__(epochs, batch_size, lr)
        checks.integer("privacy_audit.attackers", "width", width, 2)
        self.width = int(width)

    def build(self, cut_shape: tuple[int, int, int]) -> nn.Module:
        return Decoder(cut_shape, self.width)


@register_attacker("strong_decoder")
class StrongDecoderAttack(_TrainedDecoder):
    """Residual, batch-normed, label-conditioned decoder; MSE + ``ssim_weight * (1 - SSIM)``;
    one-cycle schedule; the defence's noise drawn afresh for every batch."""

    def __init__(self, epochs: int = 20, batch_size: int = 64, lr: float = 2e-3, width: int = 64, blocks: int = 2, ssim_weight: float = 0.5) -> None:
        super().__init__(epochs, batch_size, lr)
        checks.integer("privacy_audit.attackers", "width", width, 4)
        checks.integer("privacy_audit.attackers", "blocks", blocks, 0)
        checks.number("privacy_audit.attackers", "ssim_weight", ssim_weight, 0)
        self.width, self.blocks, self.ssim_weight = int(width), int(blocks), float(ssim_weight)

    def build(self, cut_shape: tuple[int, int, int]) -> nn.Module:
        return StrongDecoder(cut_shape, self.width, self.blocks)

    def loss(self, recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        mse = F.mse_loss(recon, images)
        if self.ssim_weight == 0:
            return mse
        return mse + self.ssim_weight * (1 - ssim(recon, images))

    def fresh_noise(self) -> bool:
        return True


# ----------------------------------------------------------------------------- inversion
def total_variation(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


@register_attacker("inversion")
class Inversion(PrivacyAttacker):
    """Model inversion through the known client: for each received ``z``, the image
    ``x = sigmoid(u)`` minimising ``||client(x) - z||^2 / ||z||^2 + tv * TV(x)``, from the
    class-mean ``aux`` image of its label, by Adam. No training on ``aux`` beyond the means."""

    def __init__(self, steps: int = 300, lr: float = 0.05, tv: float = 0.02, batch: int = 500) -> None:
        checks.integer("privacy_audit.attackers", "steps", steps, 1)
        checks.integer("privacy_audit.attackers", "batch", batch, 1)
        checks.number("privacy_audit.attackers", "lr", lr, 0, low_open=True)
        checks.number("privacy_audit.attackers", "tv", tv, 0)
        self.steps, self.lr, self.tv, self.batch = int(steps), float(lr), float(tv), int(batch)

    def fit(self, view: VendorView, generator: torch.Generator, progress: Progress | None = None) -> Inversion:
        self._client = view.client
        self._means = class_means(view.aux, view.aux_labels)
        return self

    def reconstruct(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._invert(features[i : i + self.batch].float(), labels[i : i + self.batch]) for i in range(0, len(labels), self.batch)])

    def _invert(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        u = torch.logit(self._means[labels].clamp(0.02, 0.98)).clone().requires_grad_(True)
        optimizer = torch.optim.Adam([u], lr=self.lr)
        scale = z.pow(2).flatten(1).sum(1).clamp_min(1e-12)
        with torch.enable_grad():
            for _ in range(self.steps):
                x = torch.sigmoid(u)
                fit = ((self._client(x) - z).pow(2).flatten(1).sum(1) / scale).mean()
                loss = fit + self.tv * total_variation(x)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        return torch.sigmoid(u).detach()

    def options(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
