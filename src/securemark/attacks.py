"""Attacks: what a customer (or a coalition of customers) may do to a copy before leaking it.

Every attack is a plug-in registered by name (``@register_attack("prune")``) and built
with ``create_attack(name, **cfg)``; its config is its constructor's keyword arguments,
checked when it is built (a bad value is a :class:`ValueError` that names it). An attack
is called as ``attack(models, data, generator)``:

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
import inspect
import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from securemark.alignment import conv_blocks, permute_channels, scale_channels
from securemark.fingerprint import EmbedConfig, EmbeddingFailed, embed
from securemark.key import SECRET_BYTES, projection
from securemark.model import SplitNet, init_weights
from securemark.registry import Registry
from securemark.training import train_epochs

log = logging.getLogger(__name__)

__all__ = [
    "AttackData",
    "Attack",
    "register_attack",
    "create_attack",
    "available_attacks",
    "FineTune",
    "Prune",
    "Average",
    "Quantize",
    "Noise",
    "Overwrite",
    "Retrain",
    "Permute",
    "Rescale",
    "Compose",
]

OPTIMIZERS = ("adam", "sgd")


# --------------------------------------------------------------------------- inputs


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
            raise ValueError(f"AttackData.images must be a float tensor [N, 1, 28, 28], got {_describe(images)}")
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.dim() != 1:
            raise ValueError(f"AttackData.labels must be an int64 tensor [N], got {_describe(labels)}")
        if len(images) != len(labels) or len(labels) == 0:
            raise ValueError(f"AttackData needs as many labels as images, and at least one: {len(images)} images, {len(labels)} labels")
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


# --------------------------------------------------------------------------- registry


class Attack:
    """Base class of every attack: ``attack(models, data, generator) -> new SplitNet``.

    Subclasses implement :meth:`apply`, which receives validated inputs and must not
    change them in place; :meth:`__call__` checks the inputs and moves the result to CPU.
    """

    kind: ClassVar[str] = ""  # the registry name, set by @register_attack
    min_models: ClassVar[int] = 1

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


def create_attack(name: str, **cfg: Any) -> Attack:
    """Build the attack registered as ``name`` with config ``cfg`` (its constructor kwargs).

    Raises:
        ValueError: unknown attack (the message lists the valid names), unknown
            parameter (the message lists the accepted ones), or an invalid value.
    """
    cls = _ATTACKS.get(name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(cfg) - set(accepted))
    if unknown:
        raise ValueError(f"attack {name!r}: unknown parameter(s) {unknown}; accepted: {accepted}")
    return cls(**cfg)


# --------------------------------------------------------------------------- helpers


def _check_models(name: str, models: Any) -> list[SplitNet]:
    if isinstance(models, SplitNet):
        raise TypeError(f"attack {name!r}: pass a list of models, not a single model")
    models = list(models)
    if not models:
        raise ValueError(f"attack {name!r}: needs at least one model")
    bad = [type(m).__name__ for m in models if not isinstance(m, SplitNet)]
    if bad:
        raise TypeError(f"attack {name!r}: every model must be a SplitNet, got {bad}")
    return models


def _number(attack: str, key: str, value: Any, low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float in the interval (``low_open``/``high_open`` exclude the ends)."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok:
        v = float(value)
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"attack {attack!r}: {key} must be a number in {interval}, got {value!r}")
    return float(value)


def _integer(attack: str, key: str, value: Any, low: int, high: int | None = None) -> int:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"attack {attack!r}: {key} must be an integer {bound}, got {value!r}")
    return int(value)


def _choice(attack: str, key: str, value: Any, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ValueError(f"attack {attack!r}: {key} must be one of {list(options)}, got {value!r}")
    return str(value)


def _working_copy(model: SplitNet) -> SplitNet:
    """A deep copy on the CPU with every parameter trainable (the attacker owns it)."""
    out = copy.deepcopy(model).cpu()
    for p in out.parameters():
        p.requires_grad_(True)
    return out


def _weight_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The conv/linear modules (the parameterised layers), in forward order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


# --------------------------------------------------------------------------- attacks


@register_attack("fine_tune")
class FineTune(Attack):
    """Train the whole of ``models[0]`` on a random ``fraction`` of the attacker's data.

    Strength: ``epochs``.
    """

    def __init__(self, fraction: float = 1.0, epochs: int = 5, optimizer: str = "adam", lr: float = 1e-3, batch_size: int = 128) -> None:
        self.fraction = _number("fine_tune", "fraction", fraction, 0.0, 1.0, low_open=True)
        self.epochs = _integer("fine_tune", "epochs", epochs, 0)
        self.optimizer = _choice("fine_tune", "optimizer", optimizer, OPTIMIZERS)
        self.lr = _number("fine_tune", "lr", lr, 0.0, low_open=True)
        self.batch_size = _integer("fine_tune", "batch_size", batch_size, 1)
        self._config = dict(fraction=self.fraction, epochs=self.epochs, optimizer=self.optimizer, lr=self.lr, batch_size=self.batch_size)

    @property
    def name(self) -> str:
        """``fine_tune_adam`` / ``fine_tune_sgd``: one attack family per optimiser in reports."""
        return f"{self.kind}_{self.optimizer}"

    @property
    def strength(self) -> float:
        return float(self.epochs)

    def apply(self, models, data, generator):
        model = _working_copy(models[0])
        n = max(1, round(self.fraction * len(data)))
        part = data.subset(torch.randperm(len(data), generator=generator)[:n]) if n < len(data) else data
        return train_epochs(model, part.images, part.labels, self.epochs, generator, self.optimizer, self.lr, self.batch_size)


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
        self.rate = _number("prune", "rate", rate, 0.0, 1.0)
        self.recovery_epochs = _integer("prune", "recovery_epochs", recovery_epochs, 0)
        self.lr = _number("prune", "lr", lr, 0.0, low_open=True)
        self.batch_size = _integer("prune", "batch_size", batch_size, 1)
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
        modules = _weight_modules(model)
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
        work = _working_copy(models[0])
        modules = dict(_weight_modules(work))
        masks = self.masks(work)
        for name, mask in masks.items():
            torch_prune.custom_from_mask(modules[name], "weight", mask)
        if self.recovery_epochs:
            train_epochs(work, data.images, data.labels, self.recovery_epochs, generator, "adam", self.lr, self.batch_size)
        for module in modules.values():
            torch_prune.remove(module, "weight")
        # prune.remove re-registers ``weight`` after ``bias``; load into a plain copy so the
        # result has the input's parameter order (and no pruning hooks).
        out = _working_copy(models[0])
        out.load_state_dict(work.state_dict())
        return out


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

    def __init__(self, weights: str = "uniform") -> None:
        self.weights = _choice("average", "weights", weights, ("uniform", "random"))
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
                raise ValueError(f"attack 'average': model {i} has other parameters or shapes than model 0; only copies of one architecture can be averaged")
        w = self.mixing_weights(len(models), generator)
        merged = {}
        for key, value in states[0].items():
            if value.is_floating_point():
                total = sum(wi * s[key].detach().cpu().to(torch.float64) for wi, s in zip(w, states))
                merged[key] = total.to(value.dtype)
            else:
                merged[key] = value.clone()
        out = _working_copy(models[0])
        out.load_state_dict(merged)
        self._copies = len(models)
        return out


@register_attack("quantize")
class Quantize(Attack):
    """Per-tensor symmetric integer round trip of every floating tensor of ``models[0]``:
    ``scale = max|w| / (2^(bits-1) - 1)``, ``w' = clamp(round(w / scale)) * scale``,
    so ``|w' - w| <= scale / 2``.

    Strength: ``bits`` (fewer bits = a stronger attack).
    """

    def __init__(self, bits: int = 8) -> None:
        self.bits = _integer("quantize", "bits", bits, 2, 16)
        self._config = dict(bits=self.bits)

    @property
    def strength(self) -> float:
        return float(self.bits)

    @property
    def levels(self) -> int:
        """Largest integer level, ``2^(bits-1) - 1``."""
        return 2 ** (self.bits - 1) - 1

    def apply(self, models, data, generator):
        out = _working_copy(models[0])
        with torch.no_grad():
            for value in out.state_dict().values():  # tensors share storage with the copy
                if not value.is_floating_point() or value.numel() == 0:
                    continue
                scale = value.abs().max() / self.levels
                if scale > 0:
                    value.copy_(torch.clamp(torch.round(value / scale), -self.levels, self.levels) * scale)
        return out


@register_attack("noise")
class Noise(Attack):
    """Add Gaussian noise to every parameter tensor of ``models[0]`` (weights and biases),
    with standard deviation ``scale * std(tensor)``: a scale relative to each tensor's
    spread, so every layer is perturbed alike whatever its magnitude.

    Strength: ``scale``.
    """

    def __init__(self, scale: float = 0.1) -> None:
        self.scale = _number("noise", "scale", scale, 0.0)
        self._config = dict(scale=self.scale)

    @property
    def strength(self) -> float:
        return self.scale

    def apply(self, models, data, generator):
        out = _working_copy(models[0])
        with torch.no_grad():
            for p in out.parameters():
                if p.numel() == 0:
                    continue
                spread = p.std(correction=0) if p.numel() > 1 else p.abs().reshape(())
                noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
                p.add_(noise * (self.scale * spread))
        return out


@register_attack("overwrite")
class Overwrite(Attack):
    """The attacker embeds its OWN fingerprint with its OWN key into ``models[0]``, with
    the vendor's embedding procedure (:func:`securemark.fingerprint.embed`) on its own
    data: its feature bank is ``model.client(images)`` with its labels.

    The attacker's code word (uniform bits) and its 32-byte key secret are drawn from the
    generator, so the attack is reproducible; the key is unrelated to the vendor's.
    The accuracy tolerance is loose (``accuracy_tolerance``). If the embedding does not
    meet its margin within ``max_steps`` (:class:`EmbeddingFailed`), the attack does not
    fail: it keeps the model :func:`embed` trained for the whole step budget.

    Strength: ``margin`` (the projection size the attacker forces; larger moves the
    weights further).
    """

    def __init__(
        self,
        code_length: int = 304,
        margin: float = 0.2,
        lam: float = 1.0,
        max_steps: int = 2000,
        layer: str = "server.block3.conv.weight",
        lr: float = 1e-3,
        accuracy_tolerance: float = 0.02,
    ) -> None:
        self.code_length = _integer("overwrite", "code_length", code_length, 1)
        self.margin = _number("overwrite", "margin", margin, 0.0, low_open=True)
        self.lam = _number("overwrite", "lam", lam, 0.0, low_open=True)
        self.max_steps = _integer("overwrite", "max_steps", max_steps, 1)
        if not isinstance(layer, str) or not layer.startswith("server."):
            raise ValueError(f"attack 'overwrite': layer must name a server parameter such as 'server.block3.conv.weight', got {layer!r}")
        self.layer = layer
        self.lr = _number("overwrite", "lr", lr, 0.0, low_open=True)
        self.accuracy_tolerance = _number("overwrite", "accuracy_tolerance", accuracy_tolerance, 0.0, 1.0)
        self._config = dict(code_length=self.code_length, margin=self.margin, lam=self.lam, max_steps=self.max_steps,
                            layer=self.layer, lr=self.lr, accuracy_tolerance=self.accuracy_tolerance)

    @property
    def strength(self) -> float:
        return self.margin

    def embed_config(self, rows: int) -> EmbedConfig:
        return EmbedConfig(layer=self.layer, lam=self.lam, margin=self.margin, lr=self.lr, max_steps=self.max_steps,
                           accuracy_tolerance=self.accuracy_tolerance, eval_rows=rows)

    def apply(self, models, data, generator):
        model = _working_copy(models[0])
        params = dict(model.named_parameters())
        if self.layer not in params:
            raise ValueError(f"attack 'overwrite': layer {self.layer!r} not in the model; server parameters: "
                             f"{sorted(k for k in params if k.startswith('server.'))}")
        bits = torch.randint(0, 2, (self.code_length,), generator=generator).numpy().astype(np.uint8)
        secret = bytes(torch.randint(0, 256, (SECRET_BYTES,), generator=generator).tolist())
        key = projection(secret, self.layer, self.code_length, params[self.layer].numel())
        model.eval()
        with torch.no_grad():
            features = torch.cat([model.client(data.images[i : i + 1024]) for i in range(0, len(data), 1024)])
        cfg = self.embed_config(len(data))
        try:
            return embed(model, bits, key, features, data.labels, cfg, generator).model
        except EmbeddingFailed as exc:
            log.warning("overwrite: the attacker's own code word did not embed (%s); keeping the model trained for %d steps", exc, exc.steps)
            return exc.model


@register_attack("retrain")
class Retrain(Attack):
    """Re-initialise the last ``layers`` parameterised (conv/linear) layers of ``models[0]``
    -- or the whole server part with ``layers="server"`` -- with fresh weights from the
    generator (:func:`securemark.model.init_weights`), then train only those layers (the
    others frozen) on the attacker's data.

    Strength: the number of re-initialised layers (for ``"server"``: known once called,
    NaN before).
    """

    def __init__(self, layers: int | str = "server", epochs: int = 5, lr: float = 1e-3, batch_size: int = 128, optimizer: str = "adam") -> None:
        if layers != "server":
            layers = _integer("retrain", "layers", layers, 1)
        self.layers = layers
        self.epochs = _integer("retrain", "epochs", epochs, 0)
        self.lr = _number("retrain", "lr", lr, 0.0, low_open=True)
        self.batch_size = _integer("retrain", "batch_size", batch_size, 1)
        self.optimizer = _choice("retrain", "optimizer", optimizer, OPTIMIZERS)
        self._config = dict(layers=self.layers, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, optimizer=self.optimizer)
        self._count = float(layers) if isinstance(layers, int) else math.nan

    @property
    def strength(self) -> float:
        return self._count

    def targets(self, model: SplitNet) -> list[tuple[str, nn.Module]]:
        """The (name, module) pairs that are re-initialised, in forward order."""
        if self.layers == "server":
            return [(f"server.{n}", m) for n, m in _weight_modules(model.server)]
        modules = _weight_modules(model)
        if self.layers > len(modules):
            raise ValueError(f"attack 'retrain': layers={self.layers} but the model has only {len(modules)} conv/linear layers")
        return modules[-self.layers :]

    def apply(self, models, data, generator):
        model = _working_copy(models[0])
        targets = self.targets(model)
        trained = {id(p) for _, m in targets for p in m.parameters()}
        for _, module in targets:
            init_weights(module, generator)
        for p in model.parameters():
            p.requires_grad_(id(p) in trained)  # frozen layers need no gradients
        params = [p for p in model.parameters() if id(p) in trained]
        train_epochs(model, data.images, data.labels, self.epochs, generator, self.optimizer, self.lr, self.batch_size, parameters=params)
        for p in model.parameters():
            p.requires_grad_(True)
        self._count = float(len(targets))
        return model


@register_attack("permute")
class Permute(Attack):
    """Shuffle the channels of conv blocks of ``models[0]`` at random, the next layer's
    inputs along (:func:`securemark.alignment.permute_channels`): predictions stay the
    same, every weight moves. ``blocks``: how many blocks, from the first (client)
    block on; 0 means all of them.

    Strength: the number of blocks permuted.
    """

    def __init__(self, blocks: int = 0) -> None:
        self.blocks = _integer("permute", "blocks", blocks, 0)
        self._config = dict(blocks=self.blocks)

    @property
    def strength(self) -> float:
        return float(self.blocks)

    def apply(self, models, data, generator):
        out = _working_copy(models[0])
        blocks = conv_blocks(out)
        for index, (_, block) in enumerate(blocks[: self.blocks or len(blocks)]):
            permute_channels(out, index, torch.randperm(block.conv.out_channels, generator=generator))
        return out


@register_attack("rescale")
class Rescale(Attack):
    """Multiply every channel of every conv block of ``models[0]`` by a positive factor
    drawn log-uniformly from ``[1/spread, spread]``, and divide the next layer's inputs
    by it (:func:`securemark.alignment.scale_channels`): predictions stay the same up to
    float rounding, every weight's magnitude changes.

    Strength: ``spread``.
    """

    def __init__(self, spread: float = 4.0) -> None:
        self.spread = _number("rescale", "spread", spread, 1.0)
        self._config = dict(spread=self.spread)

    @property
    def strength(self) -> float:
        return self.spread

    def apply(self, models, data, generator):
        out = _working_copy(models[0])
        log_spread = math.log(self.spread)
        for index, (_, block) in enumerate(conv_blocks(out)):
            u = torch.rand(block.conv.out_channels, generator=generator, dtype=torch.float64)
            scale_channels(out, index, torch.exp((2 * u - 1) * log_spread))
        return out


@register_attack("compose")
class Compose(Attack):
    """A sequence of attacks: ``steps`` is a list of configs ``{"attack": name, **cfg}``.

    The first step receives all the models (so a composition may start with ``average``),
    every later step receives ``[previous output]``; all share the generator, in order.
    Name: the steps' names joined by ``>`` (e.g. ``average>fine_tune>prune``).
    Strength: the strength of the LAST step (the one swept in a grid, by convention).
    """

    def __init__(self, steps: list[dict] | tuple[dict, ...] = ({"attack": "average"}, {"attack": "fine_tune", "epochs": 1}, {"attack": "prune", "rate": 0.5})) -> None:
        if not isinstance(steps, (list, tuple)) or not steps:
            raise ValueError(f"attack 'compose': steps must be a non-empty list of {{'attack': name, ...}} configs, got {steps!r}")
        built = []
        for i, step in enumerate(steps):
            if not isinstance(step, dict) or "attack" not in step:
                raise ValueError(f"attack 'compose': step {i} must be a dict with an 'attack' key, got {step!r}")
            cfg = {k: v for k, v in step.items() if k != "attack"}
            try:
                built.append(create_attack(step["attack"], **cfg))
            except ValueError as exc:
                raise ValueError(f"attack 'compose': step {i}: {exc}") from None
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
