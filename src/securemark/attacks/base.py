"""The attack interface: inputs, the base class and the registry.

Every attack is a plug-in registered by name (``@register_attack("prune")``) and built
with ``create_attack(name, **cfg)``; its config is its constructor's keyword arguments,
checked when it is built (a bad value is an :class:`~securemark.errors.InvalidConfig`
that names it). An attack is called as ``attack(models, data, generator)``:

- ``models``: the copies the attacker holds (a list of :class:`SplitNet`). Single-copy
  attacks use ``models[0]``; ``average`` uses them all (the coalition).
- ``data``: :class:`AttackData`, the attacker's own labelled images (its partition only).
- ``generator``: a CPU ``torch.Generator``; every random draw (subsets, shuffling, noise,
  fresh weights, the attacker's own code word and key) comes from it, so an attack is a
  function of its config, its inputs and the generator's state.

It returns a *new* model on the CPU and never changes its inputs (they are deep-copied).
``attack.name`` and ``attack.strength`` (one float per attack, for tables and plots) say
what was done; see each class for what its strength measures.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from securemark.errors import InvalidInput
from securemark.model import SplitNet
from securemark.registry import Registry

__all__ = ["AttackData", "Attack", "register_attack", "attack_class", "create_attack", "available_attacks", "OPTIMIZERS"]

OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True, eq=False)
class AttackData:
    """The attacker's own labelled data (its partition only), on the CPU.

    Attributes:
        images: float [N, 1, 28, 28] in [0, 1].
        labels: int64 [N], class indices.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.dim() != 4 or tuple(images.shape[1:]) != (1, 28, 28):
            raise InvalidInput(f"AttackData.images must be a float tensor [N, 1, 28, 28], got {_describe(images)}")
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.dim() != 1:
            raise InvalidInput(f"AttackData.labels must be an int64 tensor [N], got {_describe(labels)}")
        if len(images) != len(labels) or len(labels) == 0:
            raise InvalidInput(f"AttackData needs as many labels as images, and at least one: {len(images)} images, {len(labels)} labels")
        object.__setattr__(self, "images", images.detach().cpu())
        object.__setattr__(self, "labels", labels.detach().cpu())

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> AttackData:
        return AttackData(self.images[index], self.labels[index])


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} {list(x.shape)}"
    return type(x).__name__


class Attack:
    """Base class of every attack: ``attack(models, data, generator) -> new SplitNet``.

    Subclasses implement :meth:`apply`, which receives validated inputs and must not
    change them in place; :meth:`__call__` checks the inputs and moves the result to CPU.
    """

    kind: ClassVar[str] = ""  # the registry name, set by @register_attack
    min_models: ClassVar[int] = 1
    coalition: ClassVar[bool] = False  # combines several copies: the grid runs it against coalitions
    list_options: ClassVar[tuple[str, ...]] = ()  # options whose value is a list (a params grid does not expand them)

    @property
    def owner(self) -> str:
        """How error messages name this attack: ``attack 'prune'``."""
        return f"attack {self.kind!r}"

    @property
    def name(self) -> str:
        return self.kind

    @property
    def strength(self) -> float:
        raise NotImplementedError

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments (plus ``attack``), e.g. for logging or a params grid."""
        return {"attack": self.kind, **self._config}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self._config.items())})"

    def __call__(self, models: list[SplitNet], data: AttackData, generator: torch.Generator) -> SplitNet:
        models = _check_models(self.name, models)
        if not isinstance(data, AttackData):
            raise TypeError(f"attack {self.name!r}: data must be an AttackData, got {type(data).__name__}")
        if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise TypeError(f"attack {self.name!r}: generator must be a CPU torch.Generator, got {generator!r}")
        out = self.apply(models, data, generator)
        return out.cpu().eval()

    def apply(self, models: list[SplitNet], data: AttackData, generator: torch.Generator) -> SplitNet:
        raise NotImplementedError

    _config: dict[str, Any]


_ATTACKS: Registry[type[Attack]] = Registry("attack", tag="kind")
register_attack = _ATTACKS.register  # class decorator: make an attack available as create_attack(name, ...)
available_attacks = _ATTACKS.names  # names of the registered attacks, sorted


def attack_class(name: str) -> type[Attack]:
    """The class registered as ``name`` (:class:`UnknownName` listing the valid names otherwise)."""
    return _ATTACKS.get(name)


def create_attack(name: str, **cfg: Any) -> Attack:
    """Build the attack registered as ``name`` with config ``cfg`` (its constructor kwargs).

    Raises:
        UnknownName: unknown attack (the message lists the valid names).
        InvalidConfig: unknown parameter (the message lists the accepted ones) or an
            invalid value (the message names it).
    """
    return _ATTACKS.create(name, **cfg)


def _check_models(name: str, models: Any) -> list[SplitNet]:
    if isinstance(models, SplitNet):
        raise TypeError(f"attack {name!r}: pass a list of models, not a single model")
    models = list(models)
    if not models:
        raise InvalidInput(f"attack {name!r}: needs at least one model")
    bad = [type(m).__name__ for m in models if not isinstance(m, SplitNet)]
    if bad:
        raise TypeError(f"attack {name!r}: every model must be a SplitNet, got {bad}")
    return models


def working_copy(model: SplitNet) -> SplitNet:
    """A deep copy on the CPU with every parameter trainable (the attacker owns it)."""
    out = copy.deepcopy(model).cpu()
    for p in out.parameters():
        p.requires_grad_(True)
    return out


def weight_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The conv/linear modules (the parameterised layers), in forward order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
