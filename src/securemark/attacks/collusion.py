"""Attacks by coalitions of customers: averaging their copies."""

from __future__ import annotations

import math

import torch

from securemark import checks
from securemark.attacks.base import Attack, register_attack, working_copy
from securemark.errors import InvalidInput

__all__ = ["Average"]


@register_attack("average")
class Average(Attack):
    """Collusion by averaging: the parameter-wise weighted mean of ALL given models.

    ``weights="uniform"``: every copy weighs ``1/c``; ``"random"``: convex weights drawn
    from Dirichlet(1, ..., 1) with the generator (see :meth:`mixing_weights`). Every
    floating tensor of the state dict is averaged (in float64); other tensors are taken
    from ``models[0]``.

    Strength: the number of models averaged (the coalition size ``c``), known once the
    attack has been called (NaN before).
    """

    coalition = True

    def __init__(self, weights: str = "uniform") -> None:
        self.weights = checks.choice(self.owner, "weights", weights, ("uniform", "random"))
        self._config = dict(weights=self.weights)
        self._copies = math.nan

    @property
    def strength(self) -> float:
        return float(self._copies)

    def mixing_weights(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """float64 [count], non-negative, summing to 1; the first draw :meth:`apply` makes."""
        if self.weights == "uniform":
            return torch.full((count,), 1.0 / count, dtype=torch.float64)
        # Dirichlet(1, ..., 1) = normalised i.i.d. Exponential(1) draws.
        draws = torch.empty(count, dtype=torch.float64).exponential_(1.0, generator=generator)
        return draws / draws.sum()

    def apply(self, models, data, generator):
        states = [m.state_dict() for m in models]
        reference = {k: (v.shape, v.dtype) for k, v in states[0].items()}
        for i, state in enumerate(states[1:], start=1):
            if {k: (v.shape, v.dtype) for k, v in state.items()} != reference:
                raise InvalidInput(f"attack 'average': model {i} has other parameters or shapes than model 0; only copies of one architecture can be averaged")
        w = self.mixing_weights(len(models), generator)
        merged = {}
        for key, value in states[0].items():
            if value.is_floating_point():
                total = sum(wi * s[key].detach().cpu().to(torch.float64) for wi, s in zip(w, states))
                merged[key] = total.to(value.dtype)
            else:
                merged[key] = value.clone()
        out = working_copy(models[0])
        out.load_state_dict(merged)
        self._copies = len(models)
        return out
