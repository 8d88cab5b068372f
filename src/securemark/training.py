"""Supervised training shared by split training, baselines, null models and attacks.

- :class:`Recipe`: the vendor's training recipe (optimiser, schedule, regularisation,
  augmentation). Split training (:mod:`securemark.split`) follows it at every party, and
  the attacker-alone baseline trains with exactly the same recipe on the attacker's data.
- :func:`augment`: random crop (zero padding) and horizontal flip, per image, from a generator.
- :func:`train_with_recipe`: central training with a recipe (baselines, null models).
- :func:`train_epochs`: plain training with a constant learning rate (what the attacks use).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from securemark import checks
from securemark.errors import ConfigError

SCHEDULES = ("onecycle", "constant")


@dataclass(frozen=True)
class Recipe:
    """How a model is trained.

    Attributes:
        epochs: passes over the training data.
        batch_size: images per step.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW's decoupled weight decay.
        schedule: ``onecycle`` (warm up to ``lr`` over ``warmup`` of the steps, then cosine
            down to 0: :func:`one_cycle`) or ``constant``.
        warmup: fraction of the steps spent warming up (``onecycle``).
        label_smoothing: cross-entropy label smoothing.
        augment: random crop (2 px zero padding) and horizontal flip of every image.
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    warmup: float = 0.25
    label_smoothing: float = 0.0
    augment: bool = False

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size"):
            if isinstance(getattr(self, key), bool) or not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(f"train.{key}", f"must be an integer >= 1, got {getattr(self, key)!r}")
        if not self.lr > 0:
            raise ConfigError("train.lr", f"must be > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ConfigError("train.weight_decay", f"must be >= 0, got {self.weight_decay}")
        if self.schedule not in SCHEDULES:
            raise ConfigError("train.schedule", f"must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        if not 0.0 < self.warmup < 1.0:
            raise ConfigError("train.warmup", f"must be in (0, 1), got {self.warmup}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError("train.label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")

    def optimizer(self, parameters, total_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
        """AdamW over ``parameters`` and its schedule for ``total_steps`` steps (None: constant)."""
        opt = torch.optim.AdamW(parameters, lr=self.lr, weight_decay=self.weight_decay)
        if self.schedule == "constant":
            return opt, None
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, one_cycle(total_steps, self.warmup))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)


def one_cycle(total_steps: int, warmup: float):
    """Learning-rate factor per step: linear warm-up from 1/25 to 1 over ``warmup`` of
    the steps, then cosine decay to 0 at ``total_steps`` (and 0 beyond)."""
    total = max(1, int(total_steps))
    warm = max(1, round(warmup * total))

    def factor(step: int) -> float:
        if step < warm:
            return 0.04 + 0.96 * step / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@contextmanager
def scoped_rng(generator: torch.Generator) -> Iterator[None]:
    """Within the block, torch's global generator (which dropout draws from) runs on a
    seed drawn from ``generator``; the caller's global stream is restored afterwards.
    So training with dropout is a function of ``generator`` alone, in any process."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random crop after ``pad`` pixels of zero padding, and a horizontal flip with
    probability 1/2, drawn per image from ``generator``; images [B, 1, H, W]."""
    b, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    out = padded[torch.arange(b)[:, None, None], 0, rows, cols].unsqueeze(1)
    flip = torch.rand(b, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def train_with_recipe(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, recipe: Recipe, generator: torch.Generator,
                      progress=None) -> nn.Module:
    """Train ``model`` in place, centrally, with ``recipe``; images float [N, 1, 28, 28].

    ``progress``: optional wrapper of the epoch range (e.g. ``tqdm``)."""
    model.to(memory_format=torch.channels_last).train()  # faster convolutions on CPUs
    steps_per_epoch = math.ceil(len(labels) / recipe.batch_size)
    opt, schedule = recipe.optimizer(model.parameters(), recipe.epochs * steps_per_epoch)
    epochs = range(recipe.epochs)
    with scoped_rng(generator):
        for _ in progress(epochs) if progress else epochs:
            for idx in torch.randperm(len(labels), generator=generator).split(recipe.batch_size):
                x = images[idx]
                if recipe.augment:
                    x = augment(x, generator)
                loss = recipe.loss(model(x.contiguous(memory_format=torch.channels_last)), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if schedule is not None:
                    schedule.step()
    return model.eval()


@torch.no_grad()
def recalibrate_norms(model: nn.Module, part: nn.Module, images: torch.Tensor, batch_size: int = 500) -> nn.Module:
    """Recompute the batch-norm statistics of ``part`` (a submodule of ``model``) from
    ``images`` run through ``model``, in place: exact averages over the images, no
    gradient, every weight unchanged. The vendor does this for the server after split
    training with its own ``aux`` images: the server's statistics were gathered on the
    owners' *noisy* features, while the delivered model never sees that noise."""
    norms = [m for m in part.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    saved = [(m, m.momentum) for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over every batch
        m.train()
    try:
        for i in range(0, len(images), batch_size):
            model(images[i : i + batch_size])
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.eval()
    return model


def train_epochs(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    generator: torch.Generator,
    optimizer: str = "adam",
    lr: float = 1e-3,
    batch_size: int = 128,
    parameters=None,
    keep_eval=(),
) -> nn.Module:
    """Train ``model`` in place with cross-entropy at a constant learning rate; images
    float [N, 1, 28, 28]. What an attacker with an off-the-shelf loop does.

    ``parameters``: train only these; ``keep_eval``: modules that stay in evaluation
    mode (frozen batch norms keep their statistics)."""
    params = list(parameters if parameters is not None else model.parameters())
    checks.choice("training", "optimizer", optimizer, ("adam", "sgd"))
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    model.train()
    for module in keep_eval:
        module.eval()
    with scoped_rng(generator):
        for _ in range(epochs):
            for idx in torch.randperm(len(labels), generator=generator).split(batch_size):
                loss = F.cross_entropy(model(images[idx]), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return model.eval()
