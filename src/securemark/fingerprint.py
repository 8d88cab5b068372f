"""Embedding a customer's code word into the server part of the model, and reading it back.

What carries the code word is a :class:`Readout` of one server layer: its effective
weight ``W`` (batch norm folded in, ``[C_out, fan_in]``) seen through what the layer
reads on the vendor's data, ``phi = vec(W S)`` with ``S = Sigma^(1/2)`` the square root
of the centred covariance of the layer's inputs on the vendor's probe images (through
the base model). ``phi`` measures the layer's *responses*: a change of ``W`` in a
direction the data barely excites barely changes ``phi``, so noise hidden there (where
it costs the attacker no accuracy) cannot hide the mark either. ``S`` depends only on
the base model and vendor data, never on a code word. (``readout: weights`` uses
``S = I``, the raw weights, as before.)

The key ``K`` (code_length x n, from :mod:`securemark.key`) projects ``phi`` to soft
values ``y = K phi``. Bit ``b_i`` is carried by the sign of ``y_i``: ``s_i = 2 b_i - 1``.
Embedding fine-tunes only server layers on the vendor's feature bank (smashed features
it already holds, so no raw image is needed) with
``CE + lambda * mean(hinge(margin - s_i * y_i))``, until every bit sits on its side with
the margin and bank accuracy is within tolerance of the base model's. The margin is in
units of the base model's RMS of ``y``, so it means the same for any layer or readout.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from securemark.errors import ConfigError, InvalidConfig, InvalidInput, SecureMarkError
from securemark.model import ConvBlock, ModelSpec, SplitNet, fold_batchnorm, forward_from, input_covariance, norm_scale, server_inputs_of, unit_index, units


class EmbeddingFailed(SecureMarkError):
    """The step budget ran out before the code word was embedded within tolerance.

    ``model`` is the partly trained copy (never to be delivered; an attacker may keep it)."""

    def __init__(self, message: str, model: SplitNet | None = None, steps: int = 0) -> None:
        super().__init__(message)
        self.model = model
        self.steps = steps


READOUTS = ("response", "weights")


@dataclass(frozen=True)
class EmbedConfig:
    layer: str = "server.dense1.linear.weight"  # weight whose readout carries the code word
    readout: str = "response"   # response: vec(W U_r Lambda_r^(1/2)) on the vendor's data | weights: vec(W)
    rank: int = 128             # response readout: the most excited input directions kept
    lam: float = 1.0            # weight of the hinge term
    margin: float = 0.3         # every bit must move by s_i * y_i >= margin, in units of the base model's RMS of y
    slack: float = 0.2          # the hinge aims at margin * (1 + slack), so bits clear it
    lr: float = 1e-3
    batch_size: int = 256
    max_steps: int = 2000       # fail loudly after this many steps
    check_every: int = 25
    accuracy_tolerance: float = 0.003  # allowed drop of bank accuracy (fraction)
    eval_rows: int = 5000       # bank rows used to check accuracy
    train_rows: int = 10000     # bank rows the embedding trains on
    key_weight: float = 0.3     # weight of the black-box term (cross-entropy on the key images' targets)
    key_agreement: float = 0.95  # fraction of the keys the copy must answer with their targets
    key_confidence: float = 0.6  # a key view answered with its target at this probability stops pulling
    restore_weight: float = 1.0  # once marked: weight of the bank labels' cross-entropy (the accuracy the stop criterion checks)
    natural_check: float = 0.5  # batched issuing: share of the vendor's aux images that checks accuracy (the rest is trained on)
    subspace: int = 256         # batched issuing: input directions of the carrying dense layer a copy may change (>= rank)
    gradient_precision: str = "auto"  # batched issuing: the key matrix's precision in the hinge's gradient (auto | bfloat16 | float32)
    natural_views: int = 0      # batched issuing: augmented copies (crop, flip) of each trained-on aux image, trained on too
    shed_keys: tuple[float, ...] = ()  # natural keys: shares of a failed copy's flips given back, one retry each (vendor.embed)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "shed_keys", tuple(float(v) for v in self.shed_keys))
        except (TypeError, ValueError):
            raise ConfigError("fingerprint.shed_keys", f"must be a list of shares in (0, 1], got {self.shed_keys!r}") from None
        if any(not 0.0 < v <= 1.0 for v in self.shed_keys) or list(self.shed_keys) != sorted(set(self.shed_keys)):
            raise ConfigError("fingerprint.shed_keys", f"must be increasing shares in (0, 1], got {list(self.shed_keys)}")
        for key in ("lam", "margin", "lr"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"fingerprint.{key}", f"must be > 0, got {getattr(self, key)}")
        for key in ("max_steps", "check_every", "batch_size", "eval_rows", "train_rows", "rank", "subspace"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"fingerprint.{key}", f"must be a positive integer, got {getattr(self, key)}")
        for key in ("key_agreement", "key_confidence"):
            if not 0.0 < getattr(self, key) <= 1.0:
                raise ConfigError(f"fingerprint.{key}", f"must be in (0, 1], got {getattr(self, key)}")
        if int(self.natural_views) < 0:
            raise ConfigError("fingerprint.natural_views", f"must be a non-negative integer, got {self.natural_views}")
        for key in ("accuracy_tolerance", "slack", "key_weight", "restore_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"fingerprint.{key}", f"must be >= 0, got {getattr(self, key)}")
        if not 0.0 <= self.natural_check < 1.0:
            raise ConfigError("fingerprint.natural_check", f"must be in [0, 1), got {self.natural_check}")
        if self.gradient_precision not in ("auto", "bfloat16", "float32"):
            raise ConfigError("fingerprint.gradient_precision", f"must be auto, bfloat16 or float32, got {self.gradient_precision!r}")
        if self.readout not in READOUTS:
            raise ConfigError("fingerprint.readout", f"must be one of {list(READOUTS)}, got {self.readout!r}")
        if not self.layer.startswith("server."):
            raise ConfigError("fingerprint.layer", f"must be a server parameter (the vendor's half), got {self.layer!r}")


@dataclass(frozen=True, eq=False)
class KeyTargets:
    """The black-box part of an embedding: what the carrying block reads for every view
    of every key image (the key itself and perturbed copies of it), the label each must
    get, and which rows are the keys themselves (the ones the stop criterion checks)."""

    inputs: torch.Tensor
    labels: torch.Tensor
    original: torch.Tensor  # bool [rows]


@dataclass(frozen=True)
class EmbedResult:
    model: SplitNet
    steps: int
    ber: float
    min_margin: float        # min_i s_i * y_i in units of the base's RMS of y (>= margin when embedded)
    bank_accuracy: float
    base_bank_accuracy: float
    seconds: float
    key_agreement: float | None = None  # fraction of the keys answered with their targets
    mark_steps: int | None = None  # batched issuing: the check at which both marks first held (the rest restored accuracy)
    keys_shed: int = 0       # natural keys given back to the base's answer because the copy could not keep its accuracy with them


def fingerprint_unit(model: SplitNet, layer: str) -> nn.Module:
    """The block whose layer weight ``layer`` names (``server.block2.conv.weight`` ->
    the block ``server.block2``); only the weight of a unit's layer can carry a code word."""
    blocks = dict(units(model))
    path, _, leaf = layer.rpartition(".")
    block_path, _, layer_name = path.rpartition(".")
    if leaf != "weight" or block_path not in blocks or layer_name not in ("conv", "linear"):
        valid = [f"{p}.{'conv' if isinstance(b, ConvBlock) else 'linear'}.weight" for p, b in blocks.items()]
        raise InvalidConfig(f"fingerprint layer {layer!r} is not the weight of a conv or dense block; choose one of {valid}")
    return blocks[block_path]


def effective_weight(model: SplitNet, layer: str) -> torch.Tensor:
    """The weight of ``layer`` as the model applies it in evaluation mode: with a batch
    norm after it, each output channel times ``gamma / sqrt(running_var + eps)``
    (the weight :func:`~securemark.model.fold_batchnorm` writes). Differentiable in the
    layer's weight and the norm's gamma; the fingerprint lives in this weight, so
    splitting a scale between layer and norm cannot hide it."""
    block = fingerprint_unit(model, layer)
    weight = block.layer.weight
    scale = norm_scale(block)
    if scale is None:
        return weight
    return weight * scale.view((-1,) + (1,) * (weight.dim() - 1))


@dataclass(frozen=True, eq=False)
class Readout:
    """What the key projects: ``phi(model) = vec(W M) - vec(W_base M)`` for the effective
    weight ``W`` of ``layer`` (rows flattened to ``[C_out, fan_in]``) and a fixed
    ``[fan_in, r]`` matrix ``M`` (None: the raw weights, ``M = I``).

    The base model's own readout (``origin``) is subtracted: what the key reads is how
    far a model moved from the vendor's base, so the base's projection does not drown
    the code word (it would otherwise be the same "noise" in every copy and in every
    average of copies). ``origin`` depends only on the base model and vendor data, never
    on a code word.

    The response readout takes ``M = U_r Lambda_r^(1/2)``: the ``r`` most excited
    directions of the layer's centred inputs on the vendor's probe images (through the
    base model), each scaled by its standard deviation. ``W M`` is then what the layer
    computes on that data, in its ``r`` strongest directions: weights the data does not
    excite are not read at all. Each row is then brought to the base model's row norm
    (``norms``): a unit's output scale is a re-parametrisation (the next layer can undo
    it), so the readout reads each unit's response *direction* and is blind to it."""

    layer: str
    metric: torch.Tensor | None = None
    norms: torch.Tensor | None = None
    origin: torch.Tensor | None = None

    @classmethod
    def build(cls, kind: str, base: SplitNet, layer: str, probe: torch.Tensor | None, rank: int = 128) -> "Readout":
        """The ``kind`` readout (``response`` or ``weights``) of ``layer`` for the vendor's
        base model; ``response`` needs the probe images (float [N, 1, 28, 28])."""
        if kind == "weights":
            return cls(layer).centred_on(base)
        if kind != "response":
            raise InvalidConfig(f"fingerprint.readout must be one of {list(READOUTS)}, got {kind!r}")
        if probe is None or len(probe) == 0:
            raise InvalidInput("a response readout needs probe images of the vendor")
        block = fingerprint_unit(base, layer)
        index = unit_index(base, layer.rsplit(".", 2)[0])
        fan_in = block.layer.weight[0].numel()
        if rank > fan_in:
            raise InvalidConfig(f"fingerprint.rank {rank} exceeds the {fan_in} inputs of {layer}")
        eigenvalues, vectors = torch.linalg.eigh(input_covariance(fold_batchnorm(base), index, probe))
        strongest = torch.argsort(eigenvalues, descending=True)[:rank]
        metric = (vectors[:, strongest] * eigenvalues[strongest].clamp_min(0).sqrt()).to(torch.float32)
        with torch.no_grad():
            norms = (effective_weight(base, layer).flatten(1) @ metric).norm(dim=1)
        return cls(layer, metric, norms).centred_on(base)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The readout's tensors (for a safetensors file; :meth:`from_tensors` reads them back)."""
        return {name: value.contiguous() for name in ("metric", "norms", "origin") if (value := getattr(self, name)) is not None}

    @classmethod
    def from_tensors(cls, layer: str, tensors: dict[str, torch.Tensor]) -> "Readout":
        return cls(layer, tensors.get("metric"), tensors.get("norms"), tensors.get("origin"))

    def centred_on(self, base: SplitNet) -> "Readout":
        """This readout measured from ``base`` (its ``origin`` set to ``base``'s readout)."""
        with torch.no_grad():
            origin = Readout(self.layer, self.metric, self.norms).features(base).detach().clone()
        return Readout(self.layer, self.metric, self.norms, origin)

    def features(self, model: SplitNet) -> torch.Tensor:
        """``phi(model)`` as a flat tensor, differentiable in the model's parameters."""
        weight = effective_weight(model, self.layer)
        rows = weight.reshape(weight.shape[0], -1)
        if self.metric is not None:
            if self.metric.shape[0] != rows.shape[1]:
                raise InvalidInput(f"readout of {self.layer!r} expects {self.metric.shape[0]} inputs per row, the model has {rows.shape[1]}")
            rows = rows @ self.metric
            rows = rows * (self.norms / rows.norm(dim=1).clamp_min(1e-12))[:, None]
        phi = rows.reshape(-1)
        if self.origin is not None:
            if self.origin.shape != phi.shape:
                raise InvalidInput(f"readout of {self.layer!r} was built for {self.origin.numel()} values, the model gives {phi.numel()}")
            phi = phi - self.origin
        return phi


def readout_size(spec: ModelSpec, layer: str, kind: str, rank: int) -> int:
    """Length of ``phi`` (the key's number of columns), from the architecture alone."""
    weight = effective_weight(SplitNet(spec), layer)
    return int(weight.shape[0] * rank) if kind == "response" else int(weight.numel())


def extract(model: SplitNet, readout: Readout, key_matrix: torch.Tensor, whiten=None) -> torch.Tensor | dict[str, torch.Tensor]:
    """Soft values ``y = K phi(model)`` (float64 [code_length]). With ``whiten`` (a map of
    the flat readout, e.g. a drift model's), both readings from one readout pass and one
    float64 copy of the key: ``{"plain": K phi, "drift": K whiten(phi)}``."""
    with torch.no_grad():
        phi = readout.features(model).detach().to(torch.float64)
    if phi.numel() != key_matrix.shape[1]:
        raise InvalidInput(f"layer {readout.layer!r} gives {phi.numel()} values, key expects {key_matrix.shape[1]}")
    if whiten is None:
        return project(key_matrix, phi[:, None])[:, 0]
    both = project(key_matrix, torch.stack([phi, whiten(phi)], dim=1))
    return {"plain": both[:, 0], "drift": both[:, 1]}


def project(key_matrix: torch.Tensor, columns: torch.Tensor, rows: int = 16) -> torch.Tensor:
    """``K @ columns`` in float64 (``columns`` float64 [n_weights, c]), converting the float32
    key ``rows`` rows at a time: the same products as converting it whole, without allocating a
    float64 copy of the key (0.5 GB for 2,048 x 32,768). 16 rows (4 MB in float64) stay in the
    CPU's cache between the conversion and the product: 0.05 s for that key, against 0.1-0.25 s
    for 256-row chunks, whose 64 MB buffers are fresh pages every time (measured on 2 cores)."""
    return torch.cat([key_matrix[i : i + rows].to(torch.float64) @ columns for i in range(0, key_matrix.shape[0], rows)])


def signs(bits: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(2.0 * np.asarray(bits, dtype=np.float32) - 1.0)


def bit_error_rate(y: torch.Tensor, bits: np.ndarray) -> float:
    """Fraction of bits whose extracted sign differs from the code word."""
    return float(((y > 0).numpy().astype(np.uint8) != np.asarray(bits, dtype=np.uint8)).mean())


def margin_scale(base: SplitNet, readout: Readout, key_matrix: torch.Tensor) -> float:
    """The unit of :attr:`EmbedConfig.margin`: the RMS of the base model's readout
    projected by the key (what ``y`` would be without the origin subtracted)."""
    y = project(key_matrix, readout.origin.to(torch.float64)[:, None])[:, 0]
    return float(y.pow(2).mean().sqrt())


def carrier_inputs(model: SplitNet, layer: str, features: torch.Tensor, batch: int = 2048) -> torch.Tensor:
    """What the block carrying ``layer`` reads, for the feature bank's ``features`` (the
    clients' outputs): the server's earlier blocks applied once, in evaluation mode."""
    fingerprint_unit(model, layer)
    index = unit_index(model, layer.rsplit(".", 2)[0])
    model.eval()
    with torch.no_grad():
        return torch.cat([server_inputs_of(model, index, features[i : i + batch].float()) for i in range(0, len(features), batch)])


@torch.no_grad()
def tail_accuracy(model: SplitNet, index: int, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = sum(int((forward_from(model, index, inputs[i : i + 2048]).argmax(1) == labels[i : i + 2048]).sum()) for i in range(0, len(labels), 2048))
    return correct / max(len(labels), 1)


def embed(
    base: SplitNet,
    bits: np.ndarray,
    key_matrix: torch.Tensor,
    readout: Readout,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    cfg: EmbedConfig,
    generator: torch.Generator,
    keys: KeyTargets | None = None,
) -> EmbedResult:
    """A fingerprinted copy of ``base`` carrying ``bits``; ``base`` is not modified.

    ``inputs`` [N, ...] are what the carrying block reads for the vendor's feature bank
    (:func:`carrier_inputs`: computed once, shared by every copy) and ``labels`` [N] the
    bank's labels; no raw image is needed. Only the carrying block and the layers after
    it are trained (so each step is cheap), in evaluation mode (batch-norm statistics
    and dropout stay out of it). ``readout`` (built from the same base model) says what
    the key projects. With ``keys``, the copy also learns to answer the black-box key
    images with their targets (:mod:`securemark.tracing.blackbox`), in the same steps.
    """
    start = time.perf_counter()
    model = copy.deepcopy(base).eval()
    fingerprint_unit(model, cfg.layer)
    index = unit_index(model, cfg.layer.rsplit(".", 2)[0])
    trained = [p for i, (_, block) in enumerate(units(model)) if i >= index for p in block.parameters()] + list(model.server.fc.parameters())
    trained_ids = {id(p) for p in trained}
    for p in model.parameters():
        p.requires_grad_(id(p) in trained_ids)
    K = key_matrix.to(torch.float32)
    unit = margin_scale(base, readout, key_matrix)
    margin = cfg.margin * unit
    s = signs(bits)
    if s.numel() != K.shape[0]:
        raise InvalidInput(f"code word has {s.numel()} bits, key has {K.shape[0]} rows")
    order = torch.randperm(len(labels), generator=generator)
    eval_idx, train_idx = order[: cfg.eval_rows], order[cfg.eval_rows : cfg.eval_rows + cfg.train_rows]
    if len(train_idx) == 0:
        train_idx = eval_idx
    eval_x, eval_y = inputs[eval_idx].float(), labels[eval_idx]
    base_acc = tail_accuracy(model, index, eval_x, eval_y)
    with torch.no_grad():  # what the base answers on the training rows: the copy must keep answering it
        base_logits = torch.cat([forward_from(model, index, inputs[train_idx[i : i + 2048]].float()) for i in range(0, len(train_idx), 2048)])
    optimizer = torch.optim.Adam(trained, lr=cfg.lr)
    steps, acc, agree, restoring = 0, base_acc, None, False
    train_y = labels[train_idx]
    while True:
        if steps % cfg.check_every == 0 or steps >= cfg.max_steps:
            with torch.no_grad():
                y = K @ readout.features(model)
                min_margin = float((s * y).min())
                # every bit past the hinge's target: the hinge is 0 and so is its gradient, so the
                # steps until the next check skip it (the projection by K is most of a step's cost)
                hinge_on = min_margin < cfg.margin * (1 + cfg.slack) * unit
                if keys is not None:
                    answers = forward_from(model, index, keys.inputs[keys.original]).argmax(1)
                    agree = float((answers == keys.labels[keys.original]).double().mean())
            if min_margin >= margin and (agree is None or agree >= cfg.key_agreement):
                restoring = True  # marked: from now on the objective is the bank's accuracy, the constraints stay (README)
                acc = tail_accuracy(model, index, eval_x, eval_y)
                if acc >= base_acc - cfg.accuracy_tolerance:
                    break
            if steps >= cfg.max_steps:
                acc = tail_accuracy(model, index, eval_x, eval_y)
                raise EmbeddingFailed(
                    f"code word not embedded after {steps} steps: min margin {min_margin / unit:.3f} (need {cfg.margin})"
                    + ("" if agree is None else f", keys answered {agree:.3f} (need {cfg.key_agreement})")
                    + f", bank accuracy {acc:.3f} (base {base_acc:.3f}, tolerance {cfg.accuracy_tolerance})"
                    + "; raise fingerprint.max_steps or fingerprint.lam, or lower blackbox.patterns",
                    model=model.eval(),
                    steps=steps,
                )
        pick = torch.randint(len(train_idx), (cfg.batch_size,), generator=generator)
        logits = forward_from(model, index, inputs[train_idx[pick]].float())
        keep = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(base_logits[pick], 1), log_target=True, reduction="batchmean")
        loss = keep
        if restoring:
            loss = loss + cfg.restore_weight * F.cross_entropy(logits, train_y[pick])
        if hinge_on:
            hinge = F.relu(cfg.margin * (1 + cfg.slack) - s * (K @ readout.features(model)) / unit).mean()  # in margin units
            loss = loss + cfg.lam * hinge
        if keys is not None:
            rows = torch.randint(len(keys.labels), (cfg.batch_size,), generator=generator)
            key_logits = forward_from(model, index, keys.inputs[rows].float())
            unsure = key_logits.softmax(1).gather(1, keys.labels[rows, None]).squeeze(1) < cfg.key_confidence  # learned rows rest
            loss = loss + cfg.key_weight * (F.cross_entropy(key_logits, keys.labels[rows], reduction="none") * unsure).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    y = extract(model, readout, K)
    return EmbedResult(model, steps, bit_error_rate(y, bits), float((s.double() * y).min()) / unit, acc, base_acc,
                       time.perf_counter() - start, agree)
