"""Issuing many copies at once: every customer's code word embedded in one batched run.

Everything before the carrying block is the same for every customer, and so is most of
what the block computes. :class:`CarrierSpace` computes it once per base model:

- the carrying dense layer ``W0`` ([H, F]) is updated only inside a fixed subspace of
  its inputs, ``W = W0 + D Q^T`` with ``Q`` ([F, r], orthonormal) spanning the
  readout's directions (what tracing reads, :class:`~securemark.fingerprint.Readout`)
  and the directions the bank and the key images excite most. A customer's copy is
  then ``D`` ([H, r]), the block's batch-norm affine and the head: a few small matrices;
- the bank rows, the key views and the test images are projected once:
  ``x W0^T`` ([N, H]) and ``x Q`` ([N, r]), so one step for one customer costs a few
  ``[128, r] x [r, H]`` products instead of ``[128, F] x [F, H]`` ones;
- the readout is ``(W0 M + D Q^T M)``: ``W0 M`` and ``Q^T M`` are fixed.

:func:`embed_batch` trains many customers' ``(D, gamma, beta, head)`` as stacked tensors
(one Adam state per customer, each customer drawing its batches from its own generator),
so one customer's copy does not depend on which others share its batch.

Why it converges (the constraints are kept as constraints, not traded against
accuracy): each customer runs two phases.

1. *mark*: keep the base's answers on the bank (KL to the base's logits) while the
   hinge pushes every bit past ``margin * (1 + slack)`` and the key images are taught
   their symbols, until every bit clears ``margin`` and the keys are answered;
2. *restore*: the objective becomes the accuracy the stop criterion measures, cross
   entropy on the bank's labels (plus the KL term), while the hinge and the key term
   stay in the loss. Both are zero while their constraint holds with its slack, so they
   pull only when a step would break one. Bank accuracy then climbs to (and past) the
   base's, instead of random-walking around it as the KL term alone lets it: the base
   was trained with the defence's noise on the client, the bank rows are what the
   server actually sees, so the copy can fit them at least as well as the base does.

The step cap (``max_steps``) stays as a guard; hitting it raises
:class:`~securemark.fingerprint.EmbeddingFailed` naming what was short.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from securemark.errors import InvalidConfig, InvalidInput
from securemark.fingerprint import EmbedConfig, EmbeddingFailed, EmbedResult, Readout, bit_error_rate, extract, fingerprint_unit, margin_scale, signs
from securemark.model import DenseBlock, SplitNet, unit_index, units


def supports(model: SplitNet, layer: str) -> bool:
    """Whether ``layer`` can be embedded in batches: the weight of the last dense block
    (followed by the head alone) with a batch norm, the default carrying layer."""
    block = fingerprint_unit(model, layer)
    path = layer.rsplit(".", 2)[0]
    paths = [p for p, _ in units(model)]
    return isinstance(block, DenseBlock) and hasattr(block, "bn") and paths[-1] == path


@dataclass(frozen=True, eq=False)
class Projected:
    """Rows of what the carrying block reads, projected once: ``x W0^T`` and ``x Q``."""

    base: torch.Tensor   # [N, H]
    sub: torch.Tensor    # [N, r]

    def __len__(self) -> int:
        return len(self.base)


@dataclass(frozen=True, eq=False)
class KeyRows:
    """The key views projected once, and which rows are the keys themselves."""

    rows: Projected
    key_of_row: torch.Tensor   # int64 [rows]: the key each row is a view of
    original: torch.Tensor     # bool [rows]


@dataclass(frozen=True, eq=False)
class CarrierSpace:
    """What every customer's embedding shares (one base model, one key, one bank)."""

    base: SplitNet
    layer: str
    index: int
    basis: torch.Tensor        # Q [F, r]
    w0: torch.Tensor           # [H, F]
    mean: torch.Tensor         # batch norm running mean [H]
    std: torch.Tensor          # sqrt(running_var + eps) [H]
    gamma0: torch.Tensor
    beta0: torch.Tensor
    head_w0: torch.Tensor      # [10, H]
    head_b0: torch.Tensor      # [10]
    w0m: torch.Tensor          # W0 M [H, rank]
    qtm: torch.Tensor          # Q^T M [r, rank]
    readout: Readout           # what tracing reads (the base's row norms and origin inside)
    key_matrix: torch.Tensor   # K [m, H * rank] float32
    unit: float                # margin unit: the base's RMS of K phi
    train: Projected
    train_labels: torch.Tensor
    train_logits: torch.Tensor  # the base's logits on the train rows (what the copy keeps answering)
    check: Projected
    check_labels: torch.Tensor
    base_accuracy: float       # the base's accuracy on the check rows
    keys: KeyRows | None

    @classmethod
    def build(cls, base: SplitNet, readout: Readout, key_matrix: torch.Tensor, inputs: torch.Tensor, labels: torch.Tensor,
              cfg: EmbedConfig, split_seed: int, key_inputs: torch.Tensor | None = None, key_index: torch.Tensor | None = None,
              key_original: torch.Tensor | None = None, natural_inputs: torch.Tensor | None = None,
              natural_labels: torch.Tensor | None = None, natural_views: list[torch.Tensor] | None = None) -> "CarrierSpace":
        """Build the shared space. ``inputs`` [N, F] / ``labels`` [N]: what the carrying
        block reads for the feature bank (:func:`~securemark.fingerprint.carrier_inputs`);
        the first ``cfg.eval_rows`` of a permutation drawn from ``split_seed`` check
        accuracy, the next ``cfg.train_rows`` are trained on. ``key_inputs`` (optional):
        what the block reads for every key view, ``key_index`` the key of each view.
        ``natural_inputs`` / ``natural_labels``: the vendor's clean images, split by
        ``cfg.natural_check``; ``natural_views``: other views of them (each [n_natural, F],
        row ``i`` a view of image ``i``, labelled like it), trained on for the trained-on
        images only (a checked image's view is never trained on)."""
        base = copy.deepcopy(base).eval()
        if not supports(base, cfg.layer):
            raise InvalidConfig(f"batched embedding needs the last dense block's weight as fingerprint.layer, got {cfg.layer!r}")
        if readout.metric is None or readout.origin is None:
            raise InvalidConfig("batched embedding needs the response readout (fingerprint.readout: response)")
        block = fingerprint_unit(base, cfg.layer)
        index = unit_index(base, cfg.layer.rsplit(".", 2)[0])
        w0 = block.linear.weight.detach().clone()
        if inputs.shape[1] != w0.shape[1]:
            raise InvalidInput(f"carrier inputs have {inputs.shape[1]} values per row, {cfg.layer} reads {w0.shape[1]}")
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(split_seed))
        check_idx, train_idx = order[: cfg.eval_rows], order[cfg.eval_rows : cfg.eval_rows + cfg.train_rows]
        if len(train_idx) == 0:
            train_idx = check_idx
        train_x, check_x = inputs[train_idx].float(), inputs[check_idx].float()
        train_y, check_y = labels[train_idx], labels[check_idx]
        if natural_inputs is not None:  # the vendor's own clean images (aux): half checks accuracy, half is trained on
            split = torch.randperm(len(natural_labels), generator=torch.Generator().manual_seed(split_seed + 1))
            n_check = int(len(split) * cfg.natural_check)
            check_x = torch.cat([check_x, natural_inputs[split[:n_check]].float()])
            check_y = torch.cat([check_y, natural_labels[split[:n_check]]])
            trained = split[n_check:]
            views = [natural_inputs] + list(natural_views or [])
            train_x = torch.cat([train_x] + [v[trained].float() for v in views])
            train_y = torch.cat([train_y] + [natural_labels[trained]] * len(views))
        key_x = None if key_inputs is None else key_inputs.float()
        basis = subspace_basis(readout.metric, torch.cat([train_x] + ([key_x] if key_x is not None else [])), cfg.subspace,
                               split_seed)
        bn = block.bn
        space = dict(
            base=base, layer=cfg.layer, index=index, basis=basis, w0=w0,
            mean=bn.running_mean.detach().clone(), std=torch.sqrt(bn.running_var + bn.eps).detach(),
            gamma0=bn.weight.detach().clone(), beta0=bn.bias.detach().clone(),
            head_w0=base.server.fc.weight.detach().clone(), head_b0=base.server.fc.bias.detach().clone(),
            w0m=w0 @ readout.metric, qtm=basis.T @ readout.metric, readout=readout,
            key_matrix=key_matrix.to(torch.float32), unit=margin_scale(base, readout, key_matrix),
        )
        project = lambda x: Projected(x @ w0.T, x @ basis)  # noqa: E731
        train = project(train_x)
        with torch.no_grad():
            train_logits = _logits_one(space, train, None)
            check = project(check_x)
            check_labels = check_y
            base_accuracy = float((_logits_one(space, check, None).argmax(1) == check_labels).double().mean())
        keys = None
        if key_x is not None:
            keys = KeyRows(project(key_x), key_index, key_original)
        return cls(**space, train=train, train_labels=train_y, train_logits=train_logits, check=check,
                   check_labels=check_labels, base_accuracy=base_accuracy, keys=keys)

    def project(self, inputs: torch.Tensor) -> Projected:
        """Other rows (e.g. the test set's carrier inputs) projected like the bank's."""
        x = inputs.float()
        return Projected(x @ self.w0.T, x @ self.basis)

    _TENSORS = ("basis", "w0", "mean", "std", "gamma0", "beta0", "head_w0", "head_b0", "w0m", "qtm", "train_labels", "train_logits",
                "check_labels")

    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything but the key matrix (the vendor derives it from its secret), as flat
        tensors for a safetensors file; :meth:`from_tensors` reads them back."""
        out = {name: getattr(self, name).contiguous() for name in self._TENSORS}
        out.update({f"base.{k}": v.contiguous() for k, v in self.base.state_dict().items()})
        out.update({f"readout.{k}": v.contiguous() for k, v in self.readout.tensors().items()})
        for name, rows in (("train", self.train), ("check", self.check)) + ((("keys", self.keys.rows),) if self.keys else ()):
            out[f"{name}.base"], out[f"{name}.sub"] = rows.base.contiguous(), rows.sub.contiguous()
        if self.keys is not None:
            out["keys.key_of_row"], out["keys.original"] = self.keys.key_of_row.contiguous(), self.keys.original.contiguous()
        out["scalars"] = torch.tensor([self.index, self.unit, self.base_accuracy], dtype=torch.float64)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], spec, layer: str, key_matrix: torch.Tensor) -> "CarrierSpace":
        """The space :meth:`tensors` wrote, for base models of architecture ``spec``,
        carrying ``layer``, under ``key_matrix`` (the one it was built with)."""
        try:
            base = SplitNet(spec)
            base.load_state_dict({k[len("base."):]: v for k, v in tensors.items() if k.startswith("base.")})
            readout = Readout.from_tensors(layer, {k[len("readout."):]: v for k, v in tensors.items() if k.startswith("readout.")})
            rows = lambda name: Projected(tensors[f"{name}.base"], tensors[f"{name}.sub"])  # noqa: E731
            keys = KeyRows(rows("keys"), tensors["keys.key_of_row"], tensors["keys.original"]) if "keys.base" in tensors else None
            index, unit, base_accuracy = tensors["scalars"].tolist()
            return cls(base=base.eval(), layer=layer, index=int(index), readout=readout, key_matrix=key_matrix.to(torch.float32), unit=unit,
                       train=rows("train"), check=rows("check"), base_accuracy=base_accuracy, keys=keys,
                       **{name: tensors[name] for name in cls._TENSORS})
        except (KeyError, RuntimeError, ValueError) as exc:
            raise InvalidInput(f"carrier space file is incomplete or does not match the model: {exc}") from None


def subspace_basis(metric: torch.Tensor, rows: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """An orthonormal ``[F, size]`` basis: the readout's directions first (the span of
    ``metric``'s columns), then the directions ``rows`` excite most beyond them."""
    fan_in, rank = metric.shape
    if not rank <= size <= fan_in:
        raise InvalidConfig(f"fingerprint.subspace must be between the readout rank {rank} and the layer's {fan_in} inputs, got {size}")
    readout_basis, _ = torch.linalg.qr(metric.double())
    centred = rows.double() - rows.double().mean(0)
    residual = centred - (centred @ readout_basis) @ readout_basis.T
    extra = size - rank
    if extra == 0:
        return readout_basis.float()
    v = _top_right_singular_vectors(residual, min(extra + 10, fan_in - rank), torch.Generator().manual_seed(seed))
    basis, _ = torch.linalg.qr(torch.cat([readout_basis, v[:, :extra]], dim=1))
    return basis.float()


def _top_right_singular_vectors(a: torch.Tensor, q: int, generator: torch.Generator, niter: int = 3) -> torch.Tensor:
    """The ``q`` leading right singular vectors of ``a`` ([rows, n] -> [n, q]) by a randomized
    range finder with power iterations (Halko et al. 2009; what ``torch.svd_lowrank`` does),
    its random start drawn from ``generator``, never from the global RNG."""
    x = a @ torch.randn(a.shape[1], q, dtype=a.dtype, generator=generator)
    basis = torch.linalg.qr(x).Q
    for _ in range(niter):
        basis = torch.linalg.qr(a.mH @ basis).Q
        basis = torch.linalg.qr(a @ basis).Q
    _, _, vh = torch.linalg.svd(basis.mH @ a, full_matrices=False)
    return vh.mH


@dataclass
class _Params:
    """One customer per leading row: the trained part of the copies, stacked."""

    d: torch.Tensor      # [B, H, r]
    gamma: torch.Tensor  # [B, H]
    beta: torch.Tensor   # [B, H]
    head_w: torch.Tensor  # [B, 10, H]
    head_b: torch.Tensor  # [B, 10]
    slices: tuple | None = None  # (d.unbind(0), head_w.unbind(0)), taken once per training step (:meth:`unbound`)

    def tensors(self) -> list[torch.Tensor]:
        return [self.d, self.gamma, self.beta, self.head_w, self.head_b]

    def unbound(self) -> "_Params":
        """The same tensors, with each customer's ``d`` and head weight taken apart once:
        every product of the step then uses these views, so autograd stacks each of their
        gradients once per step rather than once per use."""
        return _Params(*self.tensors(), slices=(self.d.unbind(0), self.head_w.unbind(0)))

    def each(self) -> tuple:
        """Each customer's ``d`` and head weight: ``(d rows, head rows)``."""
        return self.slices if self.slices is not None else (self.d.unbind(0), self.head_w.unbind(0))

    def subset(self, rows: list[int] | torch.Tensor) -> "_Params":
        """The customers ``rows``, still in this step's graph (gradients flow back here)."""
        picked = [int(r) for r in rows]
        d_rows, head_rows = self.each()
        return _Params(*(t[picked] for t in self.tensors()), slices=(tuple(d_rows[r] for r in picked), tuple(head_rows[r] for r in picked)))


def _logits(space: CarrierSpace, p: _Params, base: torch.Tensor, sub: torch.Tensor) -> torch.Tensor:
    """Logits [B, n, 10] of each customer's copy for its own rows (``base`` [B, n, H],
    ``sub`` [B, n, r]); the block runs in evaluation mode (running statistics, no dropout)."""
    d_rows, head_rows = p.each()
    pre = base + _each(sub, d_rows)
    hidden = torch.relu((pre - space.mean) / space.std * p.gamma[:, None] + p.beta[:, None])
    return _each(hidden, head_rows) + p.head_b[:, None]


def _each(a: torch.Tensor, weights) -> torch.Tensor:
    """``a[i] @ weights[i].T`` for every customer i, one product each: the same kernel
    whatever the batch holds, so a customer's copy does not depend on who shares its batch
    (a batched product may pick another kernel, and another rounding, for another size)."""
    return torch.stack([x @ w.T for x, w in zip(a, weights)])


def gradient_dtype(precision: str) -> torch.dtype:
    """The key matrix's dtype in the training step's hinge gradient
    (``fingerprint.gradient_precision``). ``auto``: bfloat16 where the CPU has native
    bfloat16 dot products (oneDNN's AVX512-BF16 or AMX kernels: 3-4x faster than float32
    there), float32 elsewhere (where bfloat16 products are emulated and slower)."""
    if precision == "auto":
        native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return torch.bfloat16 if native else torch.float32
    return GRADIENT_PRECISIONS[precision]


GRADIENT_PRECISIONS = {"bfloat16": torch.bfloat16, "float32": torch.float32}
PROJECTION_ROWS = 20  # customers per product with the key matrix (padded): its rounding never depends on the batch


def _project(phi: torch.Tensor, key_matrix: torch.Tensor) -> torch.Tensor:
    """``phi @ K^T`` in products of exactly PROJECTION_ROWS rows (the last one padded with
    zeros): one large product reads K once for several customers, and each row's result
    is the same as if the customer were alone."""
    out = []
    for s in range(0, len(phi), PROJECTION_ROWS):
        chunk = phi[s : s + PROJECTION_ROWS]
        pad = PROJECTION_ROWS - len(chunk)
        if pad:
            chunk = torch.cat([chunk, chunk.new_zeros(pad, chunk.shape[1])])
        out.append((chunk.to(key_matrix.dtype) @ key_matrix.T).float()[: PROJECTION_ROWS - pad])  # float32 sums either way
    return torch.cat(out)


def _logits_one(space: dict | CarrierSpace, rows: Projected, p: _Params | None, i: int = 0, batch: int = 4096,
                sub_low: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [n, 10] of one copy (the base's when ``p`` is None) for all of ``rows``;
    ``sub_low``: ``rows.sub`` in a lower precision, to run the copy's change in it."""
    get = space.__getitem__ if isinstance(space, dict) else lambda k: getattr(space, k)
    d = None if p is None else p.d[i]
    gamma, beta = (get("gamma0"), get("beta0")) if p is None else (p.gamma[i], p.beta[i])
    head_w, head_b = (get("head_w0"), get("head_b0")) if p is None else (p.head_w[i], p.head_b[i])
    out = []
    for s in range(0, len(rows), batch):
        if d is None:
            pre = rows.base[s : s + batch]
        elif sub_low is None:
            pre = rows.base[s : s + batch] + rows.sub[s : s + batch] @ d.T
        else:
            pre = rows.base[s : s + batch] + (sub_low[s : s + batch] @ d.to(sub_low.dtype).T).float()
        hidden = torch.relu((pre - get("mean")) / get("std") * gamma + beta)
        out.append(hidden @ head_w.T + head_b)
    return torch.cat(out)


def _soft_values(space: CarrierSpace, p: _Params, key_matrix: torch.Tensor | None = None) -> torch.Tensor:
    """``y = K phi`` [B, m] for each customer's copy (differentiable): the readout of
    ``W0 + D Q^T`` with the batch norm's scale, rows brought to the base's norms.
    ``key_matrix``: K in another precision (the training step's); default the space's
    float32 K, which every check and every issued number uses."""
    rows = (space.w0m + torch.stack([d @ space.qtm for d in p.each()[0]])) * (p.gamma / space.std)[:, :, None]
    rows = rows * (space.readout.norms / rows.norm(dim=2).clamp_min(1e-12))[:, :, None]
    phi = rows.flatten(1) - space.readout.origin
    return _project(phi, space.key_matrix if key_matrix is None else key_matrix)


@dataclass
class _Adam:
    """Adam over stacked per-customer tensors, with a step count per customer, so that
    customers can join and leave the batch without changing each other's updates."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def init(self, params: _Params) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(torch.zeros_like(t), torch.zeros_like(t)) for t in params.tensors()]

    @torch.no_grad()
    def step(self, params: _Params, state: list, grads: tuple, count: torch.Tensor) -> None:
        """Update every customer of ``params`` (its gradients ``grads``, its step count ``count``),
        in place: torch's fused Adam kernel (one pass over each tensor) on each customer's
        slice, with that customer's own step count. The kernel walks memory flat, so every
        tensor must be contiguous: the parameters and moments are (made by ``cat`` and
        indexing), the gradients are made so."""
        steps = [c.float() for c in count.unbind(0)]
        per_customer = lambda ts: [row for t in ts for row in t.unbind(0)]  # noqa: E731
        torch._fused_adam_(per_customer(params.tensors()), per_customer(g.contiguous() for g in grads), per_customer(m for m, _ in state),
                           per_customer(v for _, v in state), [], steps * len(state), lr=self.lr, beta1=self.betas[0],
                           beta2=self.betas[1], weight_decay=0.0, eps=self.eps, amsgrad=False, maximize=False)


@dataclass(frozen=True)
class Job:
    """One customer's embedding: its code word, its black-box targets (one label per key,
    or None) and the seed of its batch draws."""

    name: str
    bits: np.ndarray
    key_labels: torch.Tensor | None
    seed: int


@dataclass(frozen=True)
class Outcome:
    """A finished embedding: the copy (or the failure) and its numbers."""

    name: str
    result: EmbedResult | None
    error: EmbeddingFailed | None = None


def embed_batch(space: CarrierSpace, jobs: list[Job], cfg: EmbedConfig, progress=None, width: int | None = None) -> list[Outcome]:
    """Embed every job's code word into its own copy of ``space.base``, in one batched
    optimisation; one :class:`Outcome` per job, in order. A job that hits ``max_steps``
    comes back with ``error`` set (naming what was short); the others are unaffected.

    At most ``width`` customers (default: all) train at once; when one is done, the next
    job takes its place at the next check, so the batch never idles on its slowest
    member. A customer's copy is the same whoever shares its batch and whenever it joins
    (its own batches, Adam state and step count; per-customer products).
    ``progress(n)`` (optional) is called with the number of jobs that just finished."""
    start = time.perf_counter()
    if not jobs:
        return []
    if (space.keys is None) != all(j.key_labels is None for j in jobs) or any((j.key_labels is None) != (jobs[0].key_labels is None) for j in jobs):
        raise InvalidInput("either every job carries black-box targets (and the space has key rows) or none does")
    m = space.key_matrix.shape[0]
    for j in jobs:
        if np.asarray(j.bits).size != m:
            raise InvalidInput(f"{j.name}: code word has {np.asarray(j.bits).size} bits, key has {m} rows")
    width = len(jobs) if width is None else int(width)
    if width < 1:
        raise InvalidInput(f"the batch width must be at least 1, got {width}")
    batch = _Batch.empty(space, cfg)
    waiting = list(range(len(jobs)))
    done: dict[int, Outcome] = {}
    target = cfg.margin * (1 + cfg.slack)
    while waiting or batch.alive:
        # every row is checked every check_every of its own steps; newcomers join only when all rows are at a check
        # (or the batch is empty), so the rows stay on one schedule and each is checked exactly as if it were alone
        aligned = bool((batch.counts % cfg.check_every == 0).all())
        if aligned or bool((batch.counts >= cfg.max_steps).any()):
            finished = _check(space, batch, jobs, cfg, target, done, start)
            if aligned and waiting and len(batch.alive) < width:
                new = waiting[: width - len(batch.alive)]
                del waiting[: len(new)]
                joined = batch.join(space, jobs, new)
                finished += _check(space, batch, jobs, cfg, target, done, start, only=joined)  # its check at step 0
            if finished and progress is not None:
                progress(len(finished))
            if not batch.alive:
                continue
        batch.counts += 1
        _step(space, batch, cfg, target)
    return [done[i] for i in range(len(jobs))]


@dataclass
class _Batch:
    """The customers training now, one row each, and what each row carries: its job,
    trained tensors, Adam state, code word signs, key targets, batch generator, phase
    and step count. Rows leave together when a customer is done; new ones join at the end."""

    alive: list[int]                 # job index of each row
    params: _Params
    state: list                      # Adam (m, v) per tensor of params
    adam: _Adam
    s: torch.Tensor                  # [B, m] code word signs
    key_labels: torch.Tensor | None  # [B, key rows]
    generators: list
    restoring: torch.Tensor          # bool [B]: phase 2 (marks hold; the objective is accuracy)
    hinge_on: torch.Tensor           # bool [B]
    counts: torch.Tensor             # int64 [B]: steps this customer has taken
    marked_at: torch.Tensor          # int64 [B]: its step count when both marks first held (-1: not yet)
    gradient_key: torch.Tensor       # K in the hinge's gradient precision (fingerprint.gradient_precision)
    screen_rows: torch.Tensor | None  # the check rows' subspace part in bfloat16 (with a bfloat16 gradient): the accuracy screen

    @classmethod
    def empty(cls, space: CarrierSpace, cfg: EmbedConfig) -> "_Batch":
        params = _fresh(space, 0)
        adam = _Adam(cfg.lr)
        keys = None if space.keys is None else torch.zeros(0, len(space.keys.key_of_row), dtype=torch.long)
        return cls([], params, adam.init(params), adam, torch.zeros(0, space.key_matrix.shape[0]), keys, [], torch.zeros(0, dtype=torch.bool),
                   torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                   *_low_precision(space, gradient_dtype(cfg.gradient_precision)))

    def join(self, space: CarrierSpace, jobs: list[Job], new: list[int]) -> list[int]:
        """Rows for the jobs ``new`` (fresh copies of the base), appended; their row numbers."""
        if not new:
            return []
        k = len(new)
        fresh = _fresh(space, k)
        rows = list(range(len(self.alive), len(self.alive) + k))
        self.params = _Params(*(torch.cat([a.detach(), b]).requires_grad_(True) for a, b in zip(self.params.tensors(), fresh.tensors())))
        self.state = [(torch.cat([m, torch.zeros_like(t)]), torch.cat([v, torch.zeros_like(t)])) for (m, v), t in zip(self.state, fresh.tensors())]
        self.s = torch.cat([self.s, torch.stack([signs(jobs[i].bits) for i in new])])
        if self.key_labels is not None:
            self.key_labels = torch.cat([self.key_labels, torch.stack([jobs[i].key_labels[space.keys.key_of_row] for i in new])])
        self.generators += [torch.Generator().manual_seed(jobs[i].seed) for i in new]
        self.restoring = torch.cat([self.restoring, torch.zeros(k, dtype=torch.bool)])
        self.hinge_on = torch.cat([self.hinge_on, torch.ones(k, dtype=torch.bool)])
        self.counts = torch.cat([self.counts, torch.zeros(k, dtype=torch.long)])
        self.marked_at = torch.cat([self.marked_at, torch.full((k,), -1, dtype=torch.long)])
        self.alive += new
        return rows

    def keep(self, rows: list[int]) -> None:
        """Only the rows ``rows`` go on training."""
        self.alive = [self.alive[k] for k in rows]
        self.params = _select(self.params, rows)
        for t in self.params.tensors():
            t.requires_grad_(True)
        self.state = [(m[rows], v[rows]) for m, v in self.state]
        self.s, self.restoring, self.hinge_on, self.counts = self.s[rows], self.restoring[rows], self.hinge_on[rows], self.counts[rows]
        self.marked_at = self.marked_at[rows]
        self.key_labels = None if self.key_labels is None else self.key_labels[rows]
        self.generators = [self.generators[k] for k in rows]


def _low_precision(space: CarrierSpace, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The key matrix for the hinge's gradient, and the check rows for the accuracy screen
    (only where bfloat16 is the fast precision)."""
    return space.key_matrix.to(dtype), (space.check.sub.to(dtype) if dtype == torch.bfloat16 else None)


def _fresh(space: CarrierSpace, count: int) -> _Params:
    """``count`` untouched copies of the base's trained part (``D = 0``), stacked."""
    return _Params(torch.zeros(count, space.w0.shape[0], space.basis.shape[1]), space.gamma0.repeat(count, 1),
                   space.beta0.repeat(count, 1), space.head_w0.repeat(count, 1, 1), space.head_b0.repeat(count, 1))


def _check(space: CarrierSpace, batch: _Batch, jobs: list[Job], cfg: EmbedConfig, target: float, done: dict, start: float,
           only: list[int] | None = None) -> list[int]:
    """Check the rows due (every ``check_every`` of their own steps, or at ``max_steps``;
    ``only``: just these rows): switch phases, record finished copies and failures in
    ``done`` and drop their rows. Returns the job indices that finished."""
    rows = only if only is not None else [k for k in range(len(batch.alive))
                                          if int(batch.counts[k]) % cfg.check_every == 0 or int(batch.counts[k]) >= cfg.max_steps]
    if not rows:
        return []
    with torch.no_grad():
        sub = _select(batch.params, rows)
        margins = (batch.s[rows] * _soft_values(space, sub)).min(1).values / space.unit
        agree = _key_agreement(space, sub, None if batch.key_labels is None else batch.key_labels[rows])
    finished = []
    for j, k in enumerate(rows):
        i, steps = batch.alive[k], int(batch.counts[k])
        margin, agreement = float(margins[j]), (None if agree is None else float(agree[j]))
        batch.hinge_on[k] = margin < target
        marked = margin >= cfg.margin and (agreement is None or agreement >= cfg.key_agreement)
        if marked and not batch.restoring[k]:
            batch.restoring[k] = True  # phase 2: the objective becomes the bank's accuracy, constraints kept
            batch.marked_at[k] = steps
        need = space.base_accuracy - cfg.accuracy_tolerance
        if marked and _worth_checking(space, batch, k, need):
            accuracy = _accuracy(space, batch.params, k, space.check, space.check_labels)
            if accuracy >= need:
                finished.append(k)
                done[i] = Outcome(jobs[i].name, _result(space, batch.params, k, jobs[i], steps, margin, agreement, accuracy, start,
                                                        int(batch.marked_at[k])))
                continue
        if steps >= cfg.max_steps:
            accuracy = _accuracy(space, batch.params, k, space.check, space.check_labels)
            finished.append(k)
            done[i] = Outcome(jobs[i].name, None, EmbeddingFailed(
                f"{jobs[i].name}: code word not embedded after {steps} steps: min margin {margin:.3f} (need {cfg.margin})"
                + ("" if agreement is None else f", keys answered {agreement:.3f} (need {cfg.key_agreement})")
                + f", bank accuracy {accuracy:.4f} (base {space.base_accuracy:.4f}, tolerance {cfg.accuracy_tolerance})",
                steps=steps))
    names = [batch.alive[k] for k in finished]
    if finished:
        batch.keep([k for k in range(len(batch.alive)) if k not in finished])
    return names


SCREEN_SLACK = 0.002  # 15 of the 7,500 check rows: bfloat16 rounding moves the argmax of a few near-ties, not that many


def _worth_checking(space: CarrierSpace, batch: _Batch, k: int, need: float) -> bool:
    """Whether row ``k``'s exact (float32) accuracy check can pass, screened first with the
    copy's change run in bfloat16 (4x cheaper). A screen more than SCREEN_SLACK below the
    bar skips the exact check: at worst the copy finishes at its next check, never with
    less than the bar, since only the float32 check lets a copy pass."""
    if batch.screen_rows is None:
        return True
    with torch.no_grad():
        logits = _logits_one(space, space.check, batch.params, k, sub_low=batch.screen_rows)
    return float((logits.argmax(1) == space.check_labels).double().mean()) >= need - SCREEN_SLACK


def _select(p: _Params, rows: list[int]) -> _Params:
    return _Params(*(t.detach()[rows] for t in p.tensors()))


def _key_agreement(space: CarrierSpace, p: _Params, key_labels: torch.Tensor | None) -> torch.Tensor | None:
    """Share of the keys each customer's copy answers with its black-box symbols."""
    if space.keys is None:
        return None
    rows = space.keys.original
    count = len(p.d)
    base = space.keys.rows.base[rows].expand(count, -1, -1)
    proj = space.keys.rows.sub[rows].expand(count, -1, -1)
    answers = _logits(space, p, base, proj).argmax(2)
    return (answers == key_labels[:, rows]).double().mean(1)


def _accuracy(space: CarrierSpace, p: _Params, i: int, rows: Projected, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((_logits_one(space, rows, p, i).argmax(1) == labels).double().mean())


def _step(space: CarrierSpace, batch: _Batch, cfg: EmbedConfig, target: float) -> None:
    """One Adam step for every customer in the batch (each on its own random batch of rows)."""
    params, key_labels = batch.params.unbound(), batch.key_labels
    picks = torch.stack([torch.randint(len(space.train), (cfg.batch_size,), generator=g) for g in batch.generators])
    key_picks = None
    if key_labels is not None:
        key_picks = torch.stack([torch.randint(key_labels.shape[1], (cfg.batch_size,), generator=g) for g in batch.generators])
    logits = _logits(space, params, space.train.base[picks], space.train.sub[picks])
    base_logp = F.log_softmax(space.train_logits[picks], 2)
    logp = F.log_softmax(logits, 2)
    keep = (base_logp.exp() * (base_logp - logp)).sum(2).mean(1)  # KL(base || copy) per customer
    ce = F.cross_entropy(logits.transpose(1, 2), space.train_labels[picks], reduction="none").mean(1)
    loss = keep + cfg.restore_weight * batch.restoring.float() * ce
    if bool(batch.hinge_on.any()):
        rows = torch.nonzero(batch.hinge_on).squeeze(1)
        on = params if len(rows) == len(batch.alive) else params.subset(rows)
        y = _soft_values(space, on, batch.gradient_key)
        hinge = F.relu(target - batch.s[rows] * y / space.unit).mean(1)
        loss = loss.index_add(0, rows, cfg.lam * hinge)
    if key_picks is not None:
        labels = torch.gather(key_labels, 1, key_picks)
        key_logits = _logits(space, params, space.keys.rows.base[key_picks], space.keys.rows.sub[key_picks])
        unsure = key_logits.softmax(2).gather(2, labels[:, :, None]).squeeze(2) < cfg.key_confidence
        key_ce = F.cross_entropy(key_logits.transpose(1, 2), labels, reduction="none")
        loss = loss + cfg.key_weight * (key_ce * unsure).mean(1)
    grads = torch.autograd.grad(loss.sum(), params.tensors())
    batch.adam.step(params, batch.state, grads, batch.counts)


def _result(space: CarrierSpace, p: _Params, i: int, job: Job, steps: int, margin: float, agreement: float | None, accuracy: float,
            start: float, mark_steps: int | None = None) -> EmbedResult:
    model = copy_model(space, p, i)
    y = extract(model, space.readout, space.key_matrix)
    return EmbedResult(model, steps, bit_error_rate(y, job.bits), margin, accuracy, space.base_accuracy,
                       time.perf_counter() - start, agreement, mark_steps)


def issued_tensors(model: SplitNet, layer: str) -> tuple[torch.Tensor, ...]:
    """What issuing changes in a copy of the base, in ``_Params`` order: the carrying
    block's weight, its batch norm's scale and shift, the head's weight and bias."""
    block = fingerprint_unit(model, layer)
    return block.linear.weight, block.bn.weight, block.bn.bias, model.server.fc.weight, model.server.fc.bias


@torch.no_grad()
def copy_model(space: CarrierSpace, p: _Params, i: int) -> SplitNet:
    """Customer ``i``'s copy as a full model: the base with the carrying block and head replaced."""
    model = copy.deepcopy(space.base)
    weight, *rest = issued_tensors(model, space.layer)
    weight.copy_(space.w0 + p.d[i] @ space.basis.T)
    for tensor, value in zip(rest, (p.gamma[i], p.beta[i], p.head_w[i], p.head_b[i])):
        tensor.copy_(value)
    return model.eval()


def changes_only_carrier(space: CarrierSpace, model: SplitNet, tolerance: float = 1e-3) -> bool:
    """Whether ``model`` differs from ``space``'s base only where issuing changes a copy
    (:func:`issued_tensors`, the carrying block's weight inside the basis up to ``tolerance``
    of the change, float32 rounding); every other parameter and buffer bit-identical. Then
    :func:`copy_accuracy` is exact for it (an issued copy, not one changed since)."""
    try:
        changed = issued_tensors(model, space.layer)
    except InvalidInput:
        return False
    weight, free = changed[0], {id(t) for t in changed}
    base, state = space.base.state_dict(), model.state_dict(keep_vars=True)
    if state.keys() != base.keys() or weight.shape != space.w0.shape:
        return False
    for name, value in state.items():
        if id(value) not in free and (value.shape != base[name].shape or not torch.equal(value.detach(), base[name])):
            return False
    with torch.no_grad():
        delta = weight.detach() - space.w0
        outside = delta - (delta @ space.basis) @ space.basis.T
    return float(outside.norm()) <= tolerance * float(delta.norm()) + 1e-7 * float(space.w0.norm())


def copy_accuracy(space: CarrierSpace, model: SplitNet, rows: Projected, labels: torch.Tensor) -> float:
    """A copy's accuracy on projected rows (e.g. the test set's): exact, since issuing
    changes only the carrying block inside the basis and the layers after it."""
    weight, *rest = (t.detach() for t in issued_tensors(model, space.layer))
    p = _Params(((weight - space.w0) @ space.basis)[None], *(t[None] for t in rest))
    return _accuracy(space, p, 0, rows, labels)
