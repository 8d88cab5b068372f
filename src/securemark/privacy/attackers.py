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
- ``fora``: prior-aware, after FORA (Xu et al., CVPR 2024): a substitute client (here
  started from the shipped one) is fitted on ``aux`` so that its noisy features match
  the distribution of the features actually received (kernel MMD), then a strong
  decoder is trained through the substitute.
- ``inversion``: no training; searches for the image whose client features match the
  received ones under the known client (plus a total-variation prior), starting from
  the class-mean image.
- ``prior_inversion``: inversion through the known client with a learnt image prior: a
  label-conditioned autoencoder fitted on ``aux``; the search runs over its latent
  code (every candidate looks like a garment), then refines the pixels.
- ``label_floor``: the class-mean ``aux`` image of each label: what the labels alone
  give, the baseline that leakage is measured beyond.
"""

from __future__ import annotations

import copy
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
        received: the features the owners sent (the feature bank), float [M, *cut], if
            the attacker may use them beyond the rows it reconstructs (``fora`` must).
    """

    client: nn.Module
    sigma: float
    aux: torch.Tensor
    aux_labels: torch.Tensor
    received: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.aux.dim() != 4 or tuple(self.aux.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE) or len(self.aux) != len(self.aux_labels):
            raise InvalidInput(f"aux must be [N, 1, 28, 28] with N labels, got {tuple(self.aux.shape)} and {len(self.aux_labels)} labels")
        self.client.eval()
        for p in self.client.parameters():
            p.requires_grad_(False)

    @property
    def cut_shape(self) -> tuple[int, ...]:
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
FLAT_SIDE = 7  # a flat cut (a client bottleneck) is first mapped to a 7 x 7 map


def spatial_shape(cut_shape: tuple[int, ...], width: int) -> tuple[int, int, int]:
    """The (C, H, W) map a decoder starts from: the cut itself when it is a feature map,
    ``width`` channels at 7 x 7 when it is a flat vector (a bottleneck)."""
    if len(cut_shape) == 3:
        return tuple(cut_shape)
    if len(cut_shape) == 1:
        return (width, FLAT_SIDE, FLAT_SIDE)
    raise InvalidInput(f"features must be [C, H, W] maps or flat vectors, got shape {tuple(cut_shape)}")


class Unflatten(nn.Module):
    """A flat cut ``[B, k]`` (plus ``extra`` conditioning inputs) to a map ``[B, width, 7, 7]``."""

    def __init__(self, k: int, width: int, extra: int = 0, normed: bool = False) -> None:
        super().__init__()
        self.width = width
        self.linear = nn.Linear(k + extra, width * FLAT_SIDE * FLAT_SIDE, bias=not normed)
        self.post = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU()) if normed else nn.ReLU()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.post(self.linear(z).view(len(z), self.width, FLAT_SIDE, FLAT_SIDE))


class Decoder(nn.Module):
    """Transposed convolutions from the cut shape (C, H, W), or a flat cut through a
    linear layer to a 7 x 7 map, back to [1, 28, 28] in [0, 1]."""

    def __init__(self, cut_shape: tuple[int, ...], width: int = 32) -> None:
        super().__init__()
        c, h, _ = spatial_shape(cut_shape, width)
        layers: list[nn.Module] = [Unflatten(cut_shape[0], width)] if len(cut_shape) == 1 else []
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU()]
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
    through ``blocks`` residual blocks at the cut's resolution (a flat cut and its label
    embedding first through a linear layer to a 7 x 7 map), then upsampling stages (each
    a transposed conv and a residual block) up to 28 x 28."""

    def __init__(self, cut_shape: tuple[int, ...], width: int = 64, blocks: int = 2, label_channels: int = 8) -> None:
        super().__init__()
        _, h, _ = spatial_shape(cut_shape, width)
        self.label_map = nn.Embedding(NUM_CLASSES, label_channels)
        self.flat = len(cut_shape) == 1
        if self.flat:
            self.stem = Unflatten(cut_shape[0], width, extra=label_channels, normed=True)
        else:
            self.stem = nn.Sequential(nn.Conv2d(cut_shape[0] + label_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        body: list[nn.Module] = [Residual(width) for _ in range(blocks)]
        while h < IMAGE_SIZE:
            body += [nn.ConvTranspose2d(width, width // 2, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(width // 2), nn.ReLU(),
                     Residual(width // 2)]
            width, h = width // 2, h * 2
        body += [nn.Conv2d(width, 1, 3, padding=1)]
        self.body = nn.Sequential(*body)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        lab = self.label_map(labels)
        if self.flat:
            return _to_image(self.body(self.stem(torch.cat([z, lab], 1))))
        lab = lab[:, :, None, None].expand(-1, -1, z.shape[2], z.shape[3])
        return _to_image(self.body(self.stem(torch.cat([z, lab], 1))))


class _TrainedDecoder(PrivacyAttacker):
    """Shared training loop: fit a decoder ``(z, label) -> x`` on the vendor's ``aux``.

    ``patience`` 0 trains exactly ``epochs`` epochs (one-cycle schedule when the noise is
    drawn afresh). ``patience`` > 0 trains to convergence: a tenth of ``aux`` is held
    out, the learning rate halves when the held-out SSIM stalls, training stops once it
    has not improved for ``patience`` epochs (``epochs`` is then a cap) and the best
    epoch's decoder is kept; ``epochs_run`` says how many epochs that took."""

    def __init__(self, epochs: int, batch_size: int = 128, lr: float = 1e-3, patience: int = 0) -> None:
        checks.integer("privacy_audit.attackers", "epochs", epochs, 1)
        checks.integer("privacy_audit.attackers", "batch_size", batch_size, 1)
        checks.number("privacy_audit.attackers", "lr", lr, 0, low_open=True)
        checks.integer("privacy_audit.attackers", "patience", patience, 0)
        self.epochs, self.batch_size, self.lr, self.patience = int(epochs), int(batch_size), float(lr), int(patience)
        self.epochs_run = 0

    def build(self, cut_shape: tuple[int, ...]) -> nn.Module:
        raise NotImplementedError

    def loss(self, recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(recon, images)

    def fresh_noise(self) -> bool:
        return False

    def encoder(self, view: VendorView, generator: torch.Generator, progress: Progress | None) -> nn.Module:
        """The client the decoder is trained through (the shipped one; ``fora``: a substitute)."""
        return view.client

    def fit(self, view: VendorView, generator: torch.Generator, progress: Progress | None = None) -> _TrainedDecoder:
        client = self.encoder(view, generator, progress)
        self.net = self.build(view.cut_shape)
        clean = smash(client, view.aux, 0.0, None)
        order = torch.randperm(len(view.aux), generator=generator)
        held = order[: len(order) // 10] if self.patience else order[:0]
        train = order[len(held):]
        fixed = add_noise(clean, view.sigma, generator)  # one noisy pass, unless noise is drawn afresh per batch
        held_z = add_noise(clean[held], view.sigma, generator)
        optimizer = torch.optim.Adam(self.net.parameters(), lr=self.lr)
        steps = self.epochs * math.ceil(len(train) / self.batch_size)
        schedule = None
        if self.patience:
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=max(1, self.patience // 2))
        elif self.fresh_noise():
            schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.lr, total_steps=steps, pct_start=0.1)
        best, best_state, since = -math.inf, None, 0
        for epoch in _epochs(progress, self.epochs, self.name):
            self.net.train()
            for idx in train[torch.randperm(len(train), generator=generator)].split(self.batch_size):
                z = add_noise(clean[idx], view.sigma, generator) if self.fresh_noise() else fixed[idx]
                loss = self.loss(self.net(z, view.aux_labels[idx]), view.aux[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if schedule is not None:
                    schedule.step()
            self.epochs_run = epoch + 1
            if not self.patience:
                continue
            self.net.eval()
            with torch.no_grad():
                score = float(ssim(self.reconstruct(held_z, view.aux_labels[held]), view.aux[held]))
            plateau.step(score)
            if score > best:
                best, since = score, 0
                best_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
                self.epochs_run = epoch + 1
            else:
                since += 1
                if since >= self.patience:
                    break
        if best_state is not None:
            self.net.load_state_dict(best_state)
        self.net.eval()
        return self

    @torch.no_grad()
    def reconstruct(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.net.eval()
        return torch.cat([self.net(features[i : i + 500].float(), labels[i : i + 500]) for i in range(0, len(labels), 500)])

    def options(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_") and k not in ("net", "epochs_run")}


@register_attacker("decoder")
class PlainDecoder(_TrainedDecoder):
    """Transposed convolutions, MSE, one noisy pass of ``aux`` (the weak reference)."""

    def __init__(self, epochs: int = 15, batch_size: int = 128, lr: float = 1e-3, width: int = 32, patience: int = 0) -> None:
        super().__init__(epochs, batch_size, lr, patience)
        checks.integer("privacy_audit.attackers", "width", width, 2)
        self.width = int(width)

    def build(self, cut_shape: tuple[int, ...]) -> nn.Module:
        return Decoder(cut_shape, self.width)


@register_attacker("strong_decoder")
class StrongDecoderAttack(_TrainedDecoder):
    """Residual, batch-normed, label-conditioned decoder; MSE + ``ssim_weight * (1 - SSIM)``;
    one-cycle schedule; the defence's noise drawn afresh for every batch."""

    def __init__(self, epochs: int = 20, batch_size: int = 64, lr: float = 2e-3, width: int = 64, blocks: int = 2, ssim_weight: float = 0.5,
                 patience: int = 0) -> None:
        super().__init__(epochs, batch_size, lr, patience)
        checks.integer("privacy_audit.attackers", "width", width, 4)
        checks.integer("privacy_audit.attackers", "blocks", blocks, 0)
        checks.number("privacy_audit.attackers", "ssim_weight", ssim_weight, 0)
        self.width, self.blocks, self.ssim_weight = int(width), int(blocks), float(ssim_weight)

    def build(self, cut_shape: tuple[int, ...]) -> nn.Module:
        return StrongDecoder(cut_shape, self.width, self.blocks)

    def loss(self, recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        mse = F.mse_loss(recon, images)
        if self.ssim_weight == 0:
            return mse
        return mse + self.ssim_weight * (1 - ssim(recon, images))

    def fresh_noise(self) -> bool:
        return True


def mmd(a: torch.Tensor, b: torch.Tensor, scales: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)) -> torch.Tensor:
    """Squared maximum mean discrepancy between the rows of ``a`` and ``b`` under a sum of
    Gaussian kernels whose bandwidths are ``scales`` times the median pairwise distance."""
    a, b = a.flatten(1), b.flatten(1)
    both = torch.cat([a, b])
    d2 = torch.cdist(both, both).pow(2)
    base = d2.detach()[d2.detach() > 0].median().clamp_min(1e-12)
    kernel = sum(torch.exp(-d2 / (2 * s * s * base)) for s in scales)
    n = len(a)
    return kernel[:n, :n].mean() + kernel[n:, n:].mean() - 2 * kernel[:n, n:].mean()


@register_attacker("fora")
class Fora(StrongDecoderAttack):
    """FORA-style prior-aware attacker (Xu et al., CVPR 2024), adapted to a vendor that
    also holds the real client and every feature it received.

    1. A substitute client, started from the shipped one (``init: client``) or afresh
       (``init: scratch``, the paper's setting), is trained for ``substitute_epochs`` on
       ``aux`` so that its noisy features match the distribution of the received ones
       (multi-kernel MMD): it absorbs whatever separates the owners' features from what
       the shipped client computes on ``aux``.
    2. A strong decoder is trained on ``aux`` through the substitute (as
       ``strong_decoder``).

    (A term asking the decoder's images of the received features to give them back
    through the substitute was tried and dropped: the client's null space let it
    satisfy the term with artefacts, and SSIM fell from 0.80 to 0.50.)"""

    def __init__(self, epochs: int = 20, batch_size: int = 64, lr: float = 2e-3, width: int = 64, blocks: int = 2, ssim_weight: float = 0.5,
                 patience: int = 0, substitute_epochs: int = 10, init: str = "client") -> None:
        super().__init__(epochs, batch_size, lr, width, blocks, ssim_weight, patience)
        checks.integer("privacy_audit.attackers", "substitute_epochs", substitute_epochs, 0)
        self.substitute_epochs = int(substitute_epochs)
        self.init = checks.choice("privacy_audit.attackers", "init", init, ("client", "scratch"))

    def encoder(self, view: VendorView, generator: torch.Generator, progress: Progress | None) -> nn.Module:
        if view.received is None:
            raise InvalidInput("fora needs the received features (VendorView.received): it matches their distribution")
        substitute = copy.deepcopy(view.client)
        if self.init == "scratch":
            for module in substitute.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        substitute.eval()  # batch norms keep the shipped statistics; the weights move
        for p in substitute.parameters():
            p.requires_grad_(True)
        received = view.received.float()
        params = list(substitute.parameters())
        optimizer = torch.optim.Adam(params, lr=1e-4 if self.init == "client" else 1e-3) if params else None
        for _ in _epochs(progress, self.substitute_epochs if params else 0, f"{self.name} substitute"):
            for idx in torch.randperm(len(view.aux), generator=generator).split(128):
                target = received[torch.randint(len(received), (len(idx),), generator=generator)]
                loss = mmd(add_noise(substitute(view.aux[idx]), view.sigma, generator), target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        for p in substitute.parameters():
            p.requires_grad_(False)
        return substitute


# ----------------------------------------------------------------------------- inversion
def total_variation(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def invert_pixels(client: nn.Module, z: torch.Tensor, start: torch.Tensor, steps: int, lr: float, tv: float) -> torch.Tensor:
    """The image ``x = sigmoid(u)`` minimising ``||client(x) - z||^2 / ||z||^2 + tv * TV(x)``,
    by ``steps`` Adam steps from the images ``start``."""
    u = torch.logit(start.clamp(0.02, 0.98)).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([u], lr=lr)
    scale = z.pow(2).flatten(1).sum(1).clamp_min(1e-12)
    with torch.enable_grad():
        for _ in range(steps):
            x = torch.sigmoid(u)
            fit = ((client(x) - z).pow(2).flatten(1).sum(1) / scale).mean()
            loss = fit + tv * total_variation(x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return torch.sigmoid(u).detach()


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
        return invert_pixels(self._client, z, self._means[labels], self.steps, self.lr, self.tv)

    def options(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


class Encoder(nn.Module):
    """Image -> latent code: two stride-2 convs, then a linear layer."""

    def __init__(self, latent: int, width: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, width, 4, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.ReLU(),
                                  nn.Flatten(), nn.Linear(2 * width * 7 * 7, latent))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@register_attacker("prior_inversion")
class PriorInversion(PrivacyAttacker):
    """Inversion through the known client with a learnt image prior.

    A label-conditioned autoencoder (an :class:`Encoder` and a :class:`StrongDecoder`
    from a ``latent``-dimensional code) is fitted on ``aux`` for ``prior_epochs``
    epochs (MSE + SSIM). For each received ``z``, the code ``w`` minimising
    ``||client(G(w, y)) - z||^2 / ||z||^2 + weight * ||w - mu_y||^2 / latent`` is searched
    by Adam from ``mu_y``, the mean code of the label's ``aux`` images; the answer is
    ``G(w, y)``, refined by ``refine`` steps of pixel inversion (as ``inversion``, from
    ``G(w, y)`` instead of the class mean): the prior finds the region, the pixels the
    detail."""

    def __init__(self, steps: int = 300, lr: float = 0.05, prior_epochs: int = 30, latent: int = 32, weight: float = 0.01,
                 refine: int = 100, tv: float = 0.02, batch: int = 500) -> None:
        checks.integer("privacy_audit.attackers", "steps", steps, 1)
        checks.number("privacy_audit.attackers", "lr", lr, 0, low_open=True)
        checks.integer("privacy_audit.attackers", "prior_epochs", prior_epochs, 1)
        checks.integer("privacy_audit.attackers", "latent", latent, 2)
        checks.number("privacy_audit.attackers", "weight", weight, 0)
        checks.integer("privacy_audit.attackers", "refine", refine, 0)
        checks.number("privacy_audit.attackers", "tv", tv, 0)
        checks.integer("privacy_audit.attackers", "batch", batch, 1)
        self.steps, self.lr, self.prior_epochs, self.latent = int(steps), float(lr), int(prior_epochs), int(latent)
        self.weight, self.refine, self.tv, self.batch = float(weight), int(refine), float(tv), int(batch)

    def fit(self, view: VendorView, generator: torch.Generator, progress: Progress | None = None) -> PriorInversion:
        self._client = view.client
        encoder, prior = Encoder(self.latent), StrongDecoder((self.latent,), width=32, blocks=1)
        params = list(encoder.parameters()) + list(prior.parameters())
        optimizer = torch.optim.Adam(params, lr=2e-3)
        steps = self.prior_epochs * math.ceil(len(view.aux) / 128)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
        encoder.train(), prior.train()
        for _ in _epochs(progress, self.prior_epochs, f"{self.name} prior"):
            for idx in torch.randperm(len(view.aux), generator=generator).split(128):
                x, y = view.aux[idx], view.aux_labels[idx]
                recon = prior(encoder(x), y)
                loss = F.mse_loss(recon, x) + 0.5 * (1 - ssim(recon, x))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
        encoder.eval(), prior.eval()
        for p in params:
            p.requires_grad_(False)
        with torch.no_grad():
            codes = torch.cat([encoder(view.aux[i : i + 500]) for i in range(0, len(view.aux), 500)])
        self._prior = prior
        self._means = torch.stack([codes[view.aux_labels == c].mean(0) if (view.aux_labels == c).any() else codes.mean(0)
                                   for c in range(NUM_CLASSES)])
        return self

    def reconstruct(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._invert(features[i : i + self.batch].float(), labels[i : i + self.batch]) for i in range(0, len(labels), self.batch)])

    def _invert(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        start = self._means[labels]
        w = start.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([w], lr=self.lr)
        scale = z.pow(2).flatten(1).sum(1).clamp_min(1e-12)
        with torch.enable_grad():
            for _ in range(self.steps):
                fit = ((self._client(self._prior(w, labels)) - z).pow(2).flatten(1).sum(1) / scale).mean()
                loss = fit + self.weight * (w - start).pow(2).sum(1).mean() / self.latent
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            found = self._prior(w, labels)
        return invert_pixels(self._client, z, found, self.refine, self.lr, self.tv) if self.refine else found

    def options(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
