"""Compositions: a sequence of attacks, each applied to the previous one's output."""

from __future__ import annotations

from securemark.attacks.base import Attack, create_attack, register_attack
from securemark.errors import InvalidConfig, UnknownName

__all__ = ["Compose"]


@register_attack("compose")
class Compose(Attack):
    """A sequence of attacks: ``steps`` is a list of configs ``{"attack": name, **cfg}``.

    The first step receives all the models (so a composition may start with ``average``),
    every later step receives ``[previous output]``; all share the generator, in order.
    Name: the steps' names joined by ``>`` (e.g. ``average>fine_tune>prune``).
    Strength: the strength of the LAST step (the one swept in a grid, by convention).
    """

    list_options = ("steps",)

    def __init__(self, steps: list[dict] | tuple[dict, ...] = ({"attack": "average"}, {"attack": "fine_tune", "epochs": 1}, {"attack": "prune", "rate": 0.5})) -> None:
        if not isinstance(steps, (list, tuple)) or not steps:
            raise InvalidConfig(f"attack 'compose': steps must be a non-empty list of {{'attack': name, ...}} configs, got {steps!r}")
        built = []
        for i, step in enumerate(steps):
            if not isinstance(step, dict) or "attack" not in step:
                raise InvalidConfig(f"attack 'compose': step {i} must be a dict with an 'attack' key, got {step!r}")
            cfg = {k: v for k, v in step.items() if k != "attack"}
            try:
                built.append(create_attack(step["attack"], **cfg))
            except UnknownName as exc:
                raise UnknownName(f"attack 'compose': step {i}: {exc}") from None
            except InvalidConfig as exc:
                raise InvalidConfig(f"attack 'compose': step {i}: {exc}") from None
        self.steps: list[Attack] = built
        self._config = dict(steps=[s.config for s in built])

    @property
    def name(self) -> str:
        return ">".join(s.name for s in self.steps)

    @property
    def strength(self) -> float:
        return self.steps[-1].strength

    def apply(self, models, data, generator):
        current = models
        for step in self.steps:
            current = [step(current, data, generator)]
        return current[0]
