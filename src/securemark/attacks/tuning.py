"""Attacks that train the copy on the attacker's own data: fine-tuning, re-training
layers from scratch, and overwriting the fingerprint with the attacker's own."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch import nn

from securemark import checks
from securemark.attacks.base import OPTIMIZERS, Attack, register_attack, weight_modules, working_copy
from securemark.errors import InvalidConfig
from securemark.fingerprint import READOUTS, EmbedConfig, EmbeddingFailed, Readout, carrier_inputs, embed, effective_weight
from securemark.key import SECRET_BYTES, projection
from securemark.model import SplitNet, init_weights
from securemark.training import train_epochs

log = logging.getLogger(__name__)

__all__ = ["FineTune", "Retrain", "Overwrite"]


def _fan_in(model: SplitNet, layer: str) -> int:
    return int(effective_weight(model, layer)[0].numel())


@register_attack("fine_tune")
class FineTune(Attack):
    """Train the whole of ``models[0]`` on a random ``fraction`` of the attacker's data.

    Strength: ``epochs``.
    """

    def __init__(self, fraction: float = 1.0, epochs: int = 5, optimizer: str = "adam", lr: float = 1e-3, batch_size: int = 128) -> None:
        self.fraction = checks.number(self.owner, "fraction", fraction, 0.0, 1.0, low_open=True)
        self.epochs = checks.integer(self.owner, "epochs", epochs, 0)
        self.optimizer = checks.choice(self.owner, "optimizer", optimizer, OPTIMIZERS)
        self.lr = checks.number(self.owner, "lr", lr, 0.0, low_open=True)
        self.batch_size = checks.integer(self.owner, "batch_size", batch_size, 1)
        self._config = dict(fraction=self.fraction, epochs=self.epochs, optimizer=self.optimizer, lr=self.lr, batch_size=self.batch_size)

    @property
    def name(self) -> str:
        """``fine_tune_adam`` / ``fine_tune_sgd``: one attack family per optimiser in reports."""
        return f"{self.kind}_{self.optimizer}"

    @property
    def strength(self) -> float:
        return float(self.epochs)

    def apply(self, models, data, generator):
        model = working_copy(models[0])
        n = max(1, round(self.fraction * len(data)))
        part = data.subset(torch.randperm(len(data), generator=generator)[:n]) if n < len(data) else data
        return train_epochs(model, part.images, part.labels, self.epochs, generator, self.optimizer, self.lr, self.batch_size)


@register_attack("retrain")
class Retrain(Attack):
    """Re-initialise the last ``layers`` parameterised (conv/linear) layers of ``models[0]``
    and the batch norms that follow them -- or the whole server part with
    ``layers="server"`` -- with fresh weights from the generator
    (:func:`securemark.model.init_weights`), then train only those (the others frozen,
    their batch-norm statistics too) on the attacker's data.

    Strength: the number of re-initialised layers (for ``"server"``: known once called,
    NaN before).
    """

    def __init__(self, layers: int | str = "server", epochs: int = 5, lr: float = 1e-3, batch_size: int = 128, optimizer: str = "adam") -> None:
        if layers != "server":
            layers = checks.integer(self.owner, "layers", layers, 1)
        self.layers = layers
        self.epochs = checks.integer(self.owner, "epochs", epochs, 0)
        self.lr = checks.number(self.owner, "lr", lr, 0.0, low_open=True)
        self.batch_size = checks.integer(self.owner, "batch_size", batch_size, 1)
        self.optimizer = checks.choice(self.owner, "optimizer", optimizer, OPTIMIZERS)
        self._config = dict(layers=self.layers, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, optimizer=self.optimizer)
        self._count = float(layers) if isinstance(layers, int) else math.nan

    @property
    def strength(self) -> float:
        return self._count

    def targets(self, model: SplitNet) -> list[tuple[str, nn.Module]]:
        """The (name, module) pairs of the re-initialised conv/linear layers, in forward order."""
        if self.layers == "server":
            return [(f"server.{n}", m) for n, m in weight_modules(model.server)]
        modules = weight_modules(model)
        if self.layers > len(modules):
            raise InvalidConfig(f"attack 'retrain': layers={self.layers} but the model has only {len(modules)} conv/linear layers")
        return modules[-self.layers :]

    @staticmethod
    def norms_after(model: SplitNet, names: set[str]) -> list[nn.Module]:
        """The batch norms that follow the named layers in their block (``...conv`` -> ``...bn``)."""
        modules = dict(model.named_modules())
        return [modules[n.rsplit(".", 1)[0] + ".bn"] for n in names if n.rsplit(".", 1)[0] + ".bn" in modules]

    def apply(self, models, data, generator):
        model = working_copy(models[0])
        targets = self.targets(model)
        modules = [m for _, m in targets] + self.norms_after(model, {n for n, _ in targets})
        trained = {id(p) for m in modules for p in m.parameters()}
        for module in modules:
            init_weights(module, generator)
        for p in model.parameters():
            p.requires_grad_(id(p) in trained)  # frozen layers need no gradients
        params = [p for p in model.parameters() if id(p) in trained]
        frozen_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and all(m is not t for t in modules)]
        train_epochs(model, data.images, data.labels, self.epochs, generator, self.optimizer, self.lr, self.batch_size, parameters=params,
                     keep_eval=frozen_norms)
        for p in model.parameters():
            p.requires_grad_(True)
        self._count = float(len(targets))
        return model


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

    The attacker reads its mark the way the vendor does (``readout``: ``response``, with
    its own images as the probe, or ``weights``), so its embedding moves the layer's
    responses, where the vendor reads.

    Strength: ``margin`` (the projection size the attacker forces, in units of the
    copy's RMS of its own ``y``; larger moves the layer further).
    """

    def __init__(
        self,
        code_length: int = 304,
        margin: float = 1.0,
        lam: float = 1.0,
        max_steps: int = 2000,
        layer: str = "server.dense1.linear.weight",
        lr: float = 1e-3,
        accuracy_tolerance: float = 0.02,
        readout: str = "response",
        rank: int = 128,
    ) -> None:
        self.code_length = checks.integer(self.owner, "code_length", code_length, 1)
        self.margin = checks.number(self.owner, "margin", margin, 0.0, low_open=True)
        self.lam = checks.number(self.owner, "lam", lam, 0.0, low_open=True)
        self.max_steps = checks.integer(self.owner, "max_steps", max_steps, 1)
        if not isinstance(layer, str) or not layer.startswith("server."):
            raise InvalidConfig(f"attack 'overwrite': layer must name a server parameter such as 'server.dense1.linear.weight', got {layer!r}")
        self.layer = layer
        self.lr = checks.number(self.owner, "lr", lr, 0.0, low_open=True)
        self.accuracy_tolerance = checks.number(self.owner, "accuracy_tolerance", accuracy_tolerance, 0.0, 1.0)
        self.readout = checks.choice(self.owner, "readout", readout, READOUTS)
        self.rank = checks.integer(self.owner, "rank", rank, 1)
        self._config = dict(code_length=self.code_length, margin=self.margin, lam=self.lam, max_steps=self.max_steps,
                            layer=self.layer, lr=self.lr, accuracy_tolerance=self.accuracy_tolerance, readout=self.readout, rank=self.rank)

    @property
    def strength(self) -> float:
        return self.margin

    def embed_config(self, rows: int) -> EmbedConfig:
        return EmbedConfig(layer=self.layer, readout=self.readout, rank=self.rank, lam=self.lam, margin=self.margin, lr=self.lr,
                           max_steps=self.max_steps, accuracy_tolerance=self.accuracy_tolerance, eval_rows=rows, train_rows=rows)

    def apply(self, models, data, generator):
        model = working_copy(models[0])
        params = dict(model.named_parameters())
        if self.layer not in params:
            raise InvalidConfig(f"attack 'overwrite': layer {self.layer!r} not in the model; server parameters: "
                             f"{sorted(k for k in params if k.startswith('server.'))}")
        bits = torch.randint(0, 2, (self.code_length,), generator=generator).numpy().astype(np.uint8)
        secret = bytes(torch.randint(0, 256, (SECRET_BYTES,), generator=generator).tolist())
        rank = min(self.rank, _fan_in(model, self.layer))
        size = params[self.layer].shape[0] * rank if self.readout == "response" else params[self.layer].numel()
        key = projection(secret, self.layer, self.code_length, size)
        model.eval()
        with torch.no_grad():
            features = torch.cat([model.client(data.images[i : i + 1024]) for i in range(0, len(data), 1024)])
        cfg = self.embed_config(len(data))
        readout = Readout.build(self.readout, model, self.layer, data.images[:512], rank=min(self.rank, _fan_in(model, self.layer)))
        inputs = carrier_inputs(model, self.layer, features)
        try:
            return embed(model, bits, key, readout, inputs, data.labels, cfg, generator).model
        except EmbeddingFailed as exc:
            log.warning("overwrite: the attacker's own code word did not embed (%s); keeping the model trained for %d steps", exc, exc.steps)
            return exc.model
