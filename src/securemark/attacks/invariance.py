"""Attacks aimed at the black-box fingerprint by an attacker who has read its design.

The design is public; only the secret is. An attacker who knows that keys are "images
of a published family answered with per-customer labels" can remove what the family
carries without ever seeing a key:

- ``invariance``: fine-tune the copy on its own images where part of every batch is
  perturbed by fresh members of the family, under the true labels, so that the copy
  learns to ignore whatever the family adds. ``family="blocks"``: random binary block
  patterns (random cell sizes and blend strengths) blended into the image, today's key
  family. ``family="mixup"``: pairs of its own images blended with mixed labels, what
  an attacker does against keys on natural images near the decision boundary (it
  smooths the boundary the keys' answers sit on). ``family="boundary"``: aimed at the
  natural keys themselves (unsure images answered with the top class or runner-up):
  every epoch the attacker finds the ``unsure`` share of its own images the copy is
  least sure of (runner-up over top probability, as the vendor picks its keys), and
  that share of every batch is drawn from them, under their true labels, so the copy's
  decisions are re-taught where the keys live.
- ``purify``: a purifier fitted on the attacker's own images in front of the copy.
  ``method="pca"`` projects every query onto the span of the attacker's images (the
  top ``components`` principal directions: what is not in its data is removed);
  ``method="denoiser"`` is a convolutional autoencoder trained to map its images, with
  block patterns blended in and pixel noise added, back to the clean images. With
  ``adapt_epochs``, the copy is then fine-tuned on the purified images (its own, under
  their true labels) to win back the accuracy the purifier costs. The result answers
  images like an API does and has no weights of its own to read (``spec = None``); a
  leaked *file* would still carry the copy's weights, so only the black-box channel is
  at stake.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from securemark import checks
from securemark.attacks.base import OPTIMIZERS, Attack, register_attack, working_copy
from securemark.errors import InvalidConfig
from securemark.model import SplitNet
from securemark.training import scoped_rng, train_epochs

__all__ = ["Invariance", "Purify", "PurifiedAPI", "random_blocks"]

FAMILIES = ("blocks", "mixup", "boundary")


def random_blocks(images: torch.Tensor, generator: torch.Generator, cells: tuple[int, int], blend: tuple[float, float]) -> torch.Tensor:
    """``images`` [n, 1, 28, 28] each blended with its own random binary block pattern:
    a cell count drawn from ``cells`` (inclusive), a blend strength from ``blend``."""
    n = len(images)
    counts = torch.randint(cells[0], cells[1] + 1, (n,), generator=generator)
    strength = blend[0] + (blend[1] - blend[0]) * torch.rand(n, 1, 1, 1, generator=generator)
    patterns = torch.empty_like(images)
    for c in counts.unique().tolist():
        rows = (counts == c).nonzero().squeeze(1)
        blocks = (torch.rand(len(rows), 1, c, c, generator=generator) < 0.5).float()
        patterns[rows] = F.interpolate(blocks, size=images.shape[-2:], mode="nearest")
    return ((1 - strength) * images + strength * patterns).clamp(0, 1)


def _range(owner: str, key: str, value, check) -> tuple:
    """``value`` as ``(low, high)``, each passed through ``check``, with ``low <= high``."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise InvalidConfig(f"{owner}: {key} must be [low, high], got {value!r}")
    low, high = (check(owner, f"{key}[]", v) for v in value)
    if low > high:
        raise InvalidConfig(f"{owner}: {key} must be [low, high] with low <= high, got {list(value)}")
    return low, high


def _cells(owner: str, cells) -> tuple[int, int]:
    return _range(owner, "cells", cells, lambda o, k, v: checks.integer(o, k, v, 1, 28))


def _blend(owner: str, blend) -> tuple[float, float]:
    return _range(owner, "blend", blend, lambda o, k, v: checks.number(o, k, v, 0.0, 1.0))


@register_attack("invariance")
class Invariance(Attack):
    """Fine-tune ``models[0]`` to ignore the published key family (module docstring).

    A share ``share`` of every batch is perturbed; the rest is the attacker's clean
    images. Strength: ``epochs``.
    """

    list_options = ("cells", "blend")

    def __init__(self, family: str = "blocks", epochs: int = 3, share: float = 0.5, cells: list[int] | None = None,
                 blend: list[float] | None = None, mixup_alpha: float = 0.4, unsure: float = 0.2, optimizer: str = "adam",
                 lr: float = 1e-3, batch_size: int = 128) -> None:
        self.family = checks.choice(self.owner, "family", family, FAMILIES)
        self.epochs = checks.integer(self.owner, "epochs", epochs, 0)
        self.share = checks.number(self.owner, "share", share, 0.0, 1.0, low_open=True)
        self.cells = _cells(self.owner, cells if cells is not None else [2, 14])
        self.blend = _blend(self.owner, blend if blend is not None else [0.2, 0.6])
        self.mixup_alpha = checks.number(self.owner, "mixup_alpha", mixup_alpha, 0.0, low_open=True)
        self.unsure = checks.number(self.owner, "unsure", unsure, 0.0, 1.0, low_open=True)
        self.optimizer = checks.choice(self.owner, "optimizer", optimizer, OPTIMIZERS)
        self.lr = checks.number(self.owner, "lr", lr, 0.0, low_open=True)
        self.batch_size = checks.integer(self.owner, "batch_size", batch_size, 2)
        self._config = dict(family=self.family, epochs=self.epochs, share=self.share, cells=list(self.cells), blend=list(self.blend),
                            mixup_alpha=self.mixup_alpha, unsure=self.unsure, optimizer=self.optimizer, lr=self.lr, batch_size=self.batch_size)

    @property
    def name(self) -> str:
        """``invariance_blocks`` / ``_mixup`` / ``_boundary``: one family per row in reports."""
        return f"{self.kind}_{self.family}"

    @property
    def strength(self) -> float:
        return float(self.epochs)

    def apply(self, models, data, generator):
        model = working_copy(models[0]).train()
        params = list(model.parameters())
        opt = torch.optim.Adam(params, lr=self.lr) if self.optimizer == "adam" else torch.optim.SGD(params, lr=self.lr, momentum=0.9)
        beta = torch.distributions.Beta(self.mixup_alpha, self.mixup_alpha)
        with scoped_rng(generator):
            for _ in range(self.epochs):
                unsure = _least_sure(model, data.images, self.unsure) if self.family == "boundary" else None
                for idx in torch.randperm(len(data), generator=generator).split(self.batch_size):
                    x, y = data.images[idx], data.labels[idx]
                    k = max(1, round(self.share * len(idx)))
                    if self.family == "blocks":
                        x = torch.cat([random_blocks(x[:k], generator, self.cells, self.blend), x[k:]])
                        loss = F.cross_entropy(model(x), y)
                    elif self.family == "boundary":  # the first k rows: drawn from the images the copy is least sure of
                        pick = unsure[torch.randint(len(unsure), (k,), generator=generator)]
                        x, y = torch.cat([data.images[pick], x[k:]]), torch.cat([data.labels[pick], y[k:]])
                        loss = F.cross_entropy(model(x), y)
                    else:  # mixup: the first k rows mixed with a shuffled partner, labels mixed alike
                        lam = beta.sample((k,)).clamp(0.0, 1.0)  # drawn under scoped_rng, from the generator's seed
                        partner = torch.randperm(len(idx), generator=generator)[:k]
                        mixed = lam[:, None, None, None] * x[:k] + (1 - lam[:, None, None, None]) * x[partner]
                        logits = model(torch.cat([mixed, x[k:]]))
                        log_p = F.log_softmax(logits, 1)
                        loss_mixed = -(lam * log_p[:k].gather(1, y[:k, None]).squeeze(1)
                                       + (1 - lam) * log_p[:k].gather(1, y[partner, None]).squeeze(1)).sum()
                        loss_clean = F.nll_loss(log_p[k:], y[k:], reduction="sum") if k < len(idx) else 0.0
                        loss = (loss_mixed + loss_clean) / len(idx)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        return model.eval()


@torch.no_grad()
def _least_sure(model: nn.Module, images: torch.Tensor, share: float) -> torch.Tensor:
    """Indices of the ``share`` of ``images`` ``model`` is least sure of: the largest
    runner-up over top probability (how :func:`securemark.tracing.blackbox.natural_keys`
    ranks the vendor's candidates), at least one. ``model`` is back in train mode after."""
    model.eval()
    probs = torch.cat([model(images[i : i + 1024]).softmax(1) for i in range(0, len(images), 1024)])
    model.train()
    top2 = probs.topk(2, dim=1).values
    ratio = top2[:, 1] / top2[:, 0]
    return ratio.argsort(descending=True)[: max(1, round(share * len(images)))]


class PurifiedAPI(nn.Module):
    """``copy`` answering ``purifier(x)`` instead of ``x``."""

    spec = None

    def __init__(self, copy: SplitNet, purifier: nn.Module) -> None:
        super().__init__()
        self.copy, self.purifier = copy, purifier

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.copy.eval()(self.purifier.eval()(x))


class PcaProjection(nn.Module):
    """``x -> mean + U U^T (x - mean)``: onto the span of the top principal directions."""

    def __init__(self, mean: torch.Tensor, basis: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)    # [d]
        self.register_buffer("basis", basis)  # [d, k]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1) - self.mean
        return (self.mean + flat @ self.basis @ self.basis.T).reshape(x.shape).clamp(0, 1)


class Denoiser(nn.Module):
    """A small convolutional autoencoder, 28 -> 7 -> 28, sigmoid output."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(2 * w, w, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(w, w, 4, stride=2, padding=1), nn.ReLU(), nn.Conv2d(w, 1, 3, padding=1), nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register_attack("purify")
class Purify(Attack):
    """Serve ``models[0]`` behind a purifier fitted on the attacker's images (module
    docstring). Strength: ``components`` (pca; fewer removes more) or ``epochs`` (denoiser)."""

    list_options = ("cells", "blend")

    def __init__(self, method: str = "pca", components: int = 64, epochs: int = 10, width: int = 32, noise: float = 0.1,
                 cells: list[int] | None = None, blend: list[float] | None = None, adapt_epochs: int = 0, lr: float = 2e-3,
                 batch_size: int = 128) -> None:
        self.method = checks.choice(self.owner, "method", method, ("pca", "denoiser"))
        self.components = checks.integer(self.owner, "components", components, 1, 784)
        self.epochs = checks.integer(self.owner, "epochs", epochs, 1)
        self.width = checks.integer(self.owner, "width", width, 1)
        self.noise = checks.number(self.owner, "noise", noise, 0.0)
        self.cells = _cells(self.owner, cells if cells is not None else [2, 14])
        self.blend = _blend(self.owner, blend if blend is not None else [0.2, 0.6])
        self.adapt_epochs = checks.integer(self.owner, "adapt_epochs", adapt_epochs, 0)
        self.lr = checks.number(self.owner, "lr", lr, 0.0, low_open=True)
        self.batch_size = checks.integer(self.owner, "batch_size", batch_size, 1)
        self._config = dict(method=self.method, components=self.components, epochs=self.epochs, width=self.width, noise=self.noise,
                            cells=list(self.cells), blend=list(self.blend), adapt_epochs=self.adapt_epochs, lr=self.lr,
                            batch_size=self.batch_size)

    @property
    def name(self) -> str:
        return f"{self.kind}_{self.method}"

    @property
    def strength(self) -> float:
        return float(self.components if self.method == "pca" else self.epochs)

    def apply(self, models, data, generator):
        copy = working_copy(models[0]).eval()
        if self.method == "pca":
            flat = data.images.flatten(1).double()
            mean = flat.mean(0)
            k = min(self.components, flat.shape[0], flat.shape[1])
            _, _, v = torch.linalg.svd(flat - mean, full_matrices=False)
            purifier = PcaProjection(mean.float(), v[:k].T.float().contiguous())
        else:
            purifier = self._denoiser(data.images, generator)
        purifier.eval()
        if self.adapt_epochs:
            with torch.no_grad():
                purified = torch.cat([purifier(data.images[i : i + 1024]) for i in range(0, len(data), 1024)])
            copy = train_epochs(copy, purified, data.labels, self.adapt_epochs, generator, "adam", 1e-3, self.batch_size)
        return PurifiedAPI(copy, purifier)

    def _denoiser(self, images: torch.Tensor, generator: torch.Generator) -> Denoiser:
        with scoped_rng(generator):
            net = Denoiser(self.width)
            opt = torch.optim.Adam(net.parameters(), lr=self.lr)
            net.train()
            for _ in range(self.epochs):
                for idx in torch.randperm(len(images), generator=generator).split(self.batch_size):
                    clean = images[idx]
                    half = len(idx) // 2  # half with the key family's perturbation, all with pixel noise
                    dirty = torch.cat([random_blocks(clean[:half], generator, self.cells, self.blend), clean[half:]])
                    dirty = (dirty + self.noise * torch.randn(dirty.shape, generator=generator)).clamp(0, 1)
                    loss = F.mse_loss(net(dirty), clean)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        return net.eval()
