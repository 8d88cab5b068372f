"""Attacks that live in how a copy is served, not in its weights.

- ``serve_coalition``: a coalition's prediction API that answers each query from a
  randomly chosen member copy (``mode="random"``) or by the members' majority vote
  (``mode="vote"``). No single set of weights exists: only the API can be traced.
- ``query_filter``: an API that refuses queries it flags as unusual and answers them
  with an uninformative label. The detector is fitted on the attacker's own images only:
  ``detector="softmax"`` flags a low maximum probability of the copy, ``"distance"``
  flags a large distance of the copy's penultimate features to the nearest class mean
  of the attacker's images; the threshold refuses a fraction ``refuse`` of the
  attacker's own images. A flagged query is answered by ``fallback``: ``"alone"``, a
  network the attacker trains on its own images (a base-like label, what an unmarked
  model would say), or ``"second"``, the copy's runner-up label (for a key the copy
  answers with its customer's symbol, anything but that symbol).

The result is an ``nn.Module`` that answers images with logits, with ``spec = None``:
it has no weights a white-box trace could read (:func:`securemark.evaluation.grid.evaluate`
scores it through the black-box channel only).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from securemark import checks
from securemark.attacks.base import Attack, register_attack, working_copy
from securemark.errors import InvalidConfig
from securemark.model import SplitNet, build_model
from securemark.training import Recipe, train_with_recipe

__all__ = ["ServeCoalition", "QueryFilter", "CoalitionAPI", "FilteredAPI"]


class CoalitionAPI(nn.Module):
    """Answers from ``members``: one random member per image, or their majority vote."""

    spec = None

    def __init__(self, members: list[SplitNet], mode: str, seed: int) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.mode = mode
        self.generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "random":  # each member answers only the queries routed to it
            pick = torch.randint(len(self.members), (x.shape[0],), generator=self.generator)
            out = torch.empty(x.shape[0], 10)
            for i, member in enumerate(self.members):
                rows = (pick == i).nonzero().squeeze(1)
                if len(rows):
                    out[rows] = member.eval()(x[rows]).float()
            return out
        logits = torch.stack([m.eval()(x) for m in self.members])  # [c, n, 10]
        votes = F.one_hot(logits.argmax(2), logits.shape[2]).sum(0).double()  # [n, 10]
        return votes + 1e-3 * logits.softmax(2).mean(0).double()  # ties go to the mean probability


@register_attack("serve_coalition")
class ServeCoalition(Attack):
    """A coalition's prediction API (see the module docstring). Strength: coalition size."""

    min_models = 1
    coalition = True

    def __init__(self, mode: str = "random") -> None:
        self.mode = checks.choice(self.owner, "mode", mode, ("random", "vote"))
        self._config = dict(mode=self.mode)
        self._copies = math.nan

    @property
    def name(self) -> str:
        return f"{self.kind}_{self.mode}"

    @property
    def strength(self) -> float:
        return float(self._copies)

    def apply(self, models, data, generator):
        self._copies = len(models)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        return CoalitionAPI([working_copy(m).eval() for m in models], self.mode, seed)


class FilteredAPI(nn.Module):
    """``copy``'s answers, with flagged queries answered by ``fallback`` instead."""

    spec = None

    def __init__(self, copy: SplitNet, detector: str, threshold: float, means: torch.Tensor | None, fallback: nn.Module | None) -> None:
        super().__init__()
        self.copy, self.detector, self.threshold, self.fallback = copy, detector, threshold, fallback
        self.register_buffer("means", means if means is not None else torch.zeros(0))

    @torch.no_grad()
    def unusual(self, x: torch.Tensor) -> torch.Tensor:
        """bool [n]: the queries the detector flags."""
        return self.scores(x) > self.threshold

    @torch.no_grad()
    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """float [n]: how unusual each query is (higher = more unusual)."""
        return self._answer(x)[1]

    @torch.no_grad()
    def _answer(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The copy's logits and the detector's scores, from one forward pass."""
        logits, features = logits_and_penultimate(self.copy, x)
        return logits, self._scores(logits, features)

    def _scores(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        if self.detector == "softmax":
            return -logits.softmax(1).max(1).values
        return torch.cdist(features, self.means).min(1).values

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, scores = self._answer(x)
        flagged = scores > self.threshold
        if flagged.any():
            if self.fallback is None:  # the copy's runner-up label
                second = logits.topk(2, dim=1).indices[:, 1]
                logits = logits.clone()
                logits[flagged] = F.one_hot(second[flagged], logits.shape[1]).to(logits.dtype) * 1e3
            else:
                logits = logits.clone()
                logits[flagged] = self.fallback.eval()(x[flagged])
        return logits


@torch.no_grad()
def logits_and_penultimate(model: SplitNet, x: torch.Tensor, batch: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits for images ``x`` and what its head read to make them, from one
    forward pass (in evaluation mode) per ``batch`` images: a whole test set at once would
    hold gigabytes of activations and run 2.5x slower here."""
    seen, logits = [], []
    hook = model.server.fc.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].flatten(1)))
    try:
        model.eval()
        logits = [model(x[i : i + batch]) for i in range(0, len(x), batch)]
    finally:
        hook.remove()
    return torch.cat(logits), torch.cat(seen)


@register_attack("query_filter")
class QueryFilter(Attack):
    """An API that refuses unusual queries (see the module docstring). Strength: ``refuse``."""

    def __init__(self, detector: str = "distance", refuse: float = 0.05, fallback: str = "alone", epochs: int = 10,
                 alone: nn.Module | None = None) -> None:
        self.detector = checks.choice(self.owner, "detector", detector, ("softmax", "distance"))
        self.refuse = checks.number(self.owner, "refuse", refuse, 0.0, 1.0, low_open=True, high_open=True)
        self.fallback = checks.choice(self.owner, "fallback", fallback, ("alone", "second"))
        self.epochs = checks.integer(self.owner, "epochs", epochs, 1)
        if alone is not None and (self.fallback != "alone" or not isinstance(alone, nn.Module)):
            raise InvalidConfig(f"{self.owner}: `alone` is the fallback network of fallback 'alone' (an nn.Module), got {type(alone).__name__} "
                                f"with fallback {self.fallback!r}")
        # ``alone``: the network a filter with fallback "alone" built before on the same data and
        # generator state (its ``.fallback``), reused instead of trained again: the same network
        self.alone = alone
        self._config = dict(detector=self.detector, refuse=self.refuse, fallback=self.fallback, epochs=self.epochs)

    @property
    def name(self) -> str:
        return f"{self.kind}_{self.detector}_{self.fallback}"

    @property
    def strength(self) -> float:
        return self.refuse

    def apply(self, models, data, generator):
        copy = working_copy(models[0]).eval()
        logits, features = logits_and_penultimate(copy, data.images)  # one pass serves the class means and the threshold
        means = torch.stack([features[data.labels == c].mean(0) for c in data.labels.unique()]) if self.detector == "distance" else None
        filtered = FilteredAPI(copy, self.detector, math.inf, means, None)
        filtered.threshold = float(torch.quantile(filtered._scores(logits, features).double(), 1.0 - self.refuse))
        if self.fallback == "alone":
            alone = self.alone
            if alone is None:
                seed = int(torch.randint(0, 2**62, (1,), generator=generator))
                alone = build_model(copy.spec, seed)
                train_with_recipe(alone, data.images, data.labels, Recipe(epochs=self.epochs, batch_size=128, lr=2e-3), generator)
            filtered.fallback = alone.eval()
        return filtered
