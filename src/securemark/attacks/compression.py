"""Attacks that compress the copy: magnitude pruning (optionally with recovery
training) and weight quantisation."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from securemark import checks
from securemark.attacks.base import Attack, register_attack, weight_modules, working_copy
from securemark.training import train_epochs

__all__ = ["Prune", "Quantize"]


@register_attack("prune")
class Prune(Attack):
    """Global magnitude pruning of ``models[0]``: zero the ``rate`` fraction of all conv/linear
    weights (biases excluded) with the smallest ``|w|``, ranked over the whole model.

    With ``recovery_epochs > 0`` the pruned model is then fine-tuned on the attacker's data
    while the pruned weights stay exactly zero (torch's prune re-parametrisation
    ``weight = weight_orig * mask`` is kept during training and removed at the end).

    Strength: ``rate``.
    """

    def __init__(self, rate: float = 0.5, recovery_epochs: int = 0, lr: float = 1e-3, batch_size: int = 128) -> None:
        self.rate = checks.number(self.owner, "rate", rate, 0.0, 1.0)
        self.recovery_epochs = checks.integer(self.owner, "recovery_epochs", recovery_epochs, 0)
        self.lr = checks.number(self.owner, "lr", lr, 0.0, low_open=True)
        self.batch_size = checks.integer(self.owner, "batch_size", batch_size, 1)
        self._config = dict(rate=self.rate, recovery_epochs=self.recovery_epochs, lr=self.lr, batch_size=self.batch_size)

    @property
    def name(self) -> str:
        """``prune``, or ``prune_recovery`` when the pruned model is fine-tuned afterwards."""
        return f"{self.kind}_recovery" if self.recovery_epochs else self.kind

    @property
    def strength(self) -> float:
        return self.rate

    def masks(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Keep-masks (1 = kept) per conv/linear module name; exactly ``round(rate * total)``
        weights are pruned (ties broken by position, so the rate is met exactly)."""
        modules = weight_modules(model)
        magnitudes = torch.cat([m.weight.detach().abs().reshape(-1) for _, m in modules])
        k = round(self.rate * magnitudes.numel())
        keep = torch.ones_like(magnitudes)
        if k > 0:
            keep[torch.argsort(magnitudes, stable=True)[:k]] = 0.0
        out, start = {}, 0
        for name, m in modules:
            n = m.weight.numel()
            out[name] = keep[start : start + n].reshape(m.weight.shape)
            start += n
        return out

    def apply(self, models, data, generator):
        work = working_copy(models[0])
        modules = dict(weight_modules(work))
        masks = self.masks(work)
        for name, mask in masks.items():
            torch_prune.custom_from_mask(modules[name], "weight", mask)
        if self.recovery_epochs:
            train_epochs(work, data.images, data.labels, self.recovery_epochs, generator, "adam", self.lr, self.batch_size)
        for module in modules.values():
            torch_prune.remove(module, "weight")
        # prune.remove re-registers ``weight`` after ``bias``; load into a plain copy so the
        # result has the input's parameter order (and no pruning hooks).
        out = working_copy(models[0])
        out.load_state_dict(work.state_dict())
        return out


@register_attack("quantize")
class Quantize(Attack):
    """Per-tensor symmetric integer round trip of every floating tensor of ``models[0]``:
    ``scale = max|w| / (2^(bits-1) - 1)``, ``w' = clamp(round(w / scale)) * scale``,
    so ``|w' - w| <= scale / 2``.

    Strength: ``bits`` (fewer bits = a stronger attack).
    """

    def __init__(self, bits: int = 8) -> None:
        self.bits = checks.integer(self.owner, "bits", bits, 2, 16)
        self._config = dict(bits=self.bits)

    @property
    def strength(self) -> float:
        return float(self.bits)

    @property
    def levels(self) -> int:
        """Largest integer level, ``2^(bits-1) - 1``."""
        return 2 ** (self.bits - 1) - 1

    def apply(self, models, data, generator):
        out = working_copy(models[0])
        with torch.no_grad():
            for value in out.state_dict().values():  # tensors share storage with the copy
                if not value.is_floating_point() or value.numel() == 0:
                    continue
                scale = value.abs().max() / self.levels
                if scale > 0:
                    value.copy_(torch.clamp(torch.round(value / scale), -self.levels, self.levels) * scale)
        return out
