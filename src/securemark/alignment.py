"""Re-alignment of a suspicious model to the vendor's base model, before extraction.

Several re-parametrisations change a SplitNet's weights without changing its function:

- **permutation**: reorder the output channels of a unit (a conv or dense block: the
  layer's rows, its batch norm's entries) and the next layer's input channels (the
  next conv's ``[:, c]`` slices; for a linear layer after a conv block, the columns
  the flatten groups by channel, ``c * H * W + h * W + w``; after a dense block, column c);
- **positive rescaling of a unit's output**: multiply channel c by ``a > 0`` (the batch
  norm's weight and shift, or without a norm the layer's row and bias) and divide the
  next layer's input channel c by ``a`` (ReLU and max-pool commute with positive scaling);
- **rescaling before a batch norm**: multiply a layer's row by ``t > 0`` and the norm's
  running mean by ``t`` and ``var + eps`` by ``t^2`` (the norm undoes it), or flip a
  row's sign together with the norm's weight and mean.

Any of them scrambles the weights of the fingerprinted layer, so projecting raw weights
reads noise. :func:`align` first folds every batch norm into the layer before it
(:func:`securemark.model.fold_batchnorm`), which removes the third kind outright: the
folded weights are the same whatever the split between layer and norm. It then undoes
the first two unit by unit in forward order: it runs a fixed probe batch through the
base model and the suspect, matches every base channel to the suspect channel whose
post-ReLU activations correlate best (Hungarian matching,
``scipy.optimize.linear_sum_assignment``; correlation is blind to positive scale),
helped by the cosine of the channels' weights, estimates the scale from weight norms
(see :func:`align`), and writes the inverse into the folded suspect. A re-parametrised
copy of a model thus aligns to the same folded weights as the model itself (up to
float rounding).

Alignment depends only on the suspect, the base model and the probe images, never on a
code word, so an innocent customer's code word stays independent of the extracted
``y`` and the distribution-free threshold of :mod:`securemark.scoring` still holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import nn

from securemark.errors import InvalidInput
from securemark.model import ConvBlock, SplitNet, fold_batchnorm, input_covariance, matrix_sqrt, units

__all__ = ["BlockAlignment", "Alignment", "Aligner", "ProbePass", "probe_pass", "units", "permute_channels", "scale_channels", "scale_before_norm", "align"]


@dataclass(frozen=True)
class BlockAlignment:
    """How one unit of the suspect maps onto the base model's.

    Attributes:
        block: the unit's module path, e.g. ``client.block1`` or ``server.dense1``.
        permutation: int [C]; base channel j is played by suspect channel ``permutation[j]``.
        scales: float [C]; that suspect channel's output is ``scales[j]`` times the base channel's.
        correlation: float [C]; mean similarity (activation correlation and weight
            cosines) of each matched pair: 1.0 for a pure re-parametrisation of the
            reference, lower after fine-tuning or the vendor's embedding.
    """

    block: str
    permutation: np.ndarray
    scales: np.ndarray
    correlation: np.ndarray

    @property
    def is_identity(self) -> bool:
        return bool((self.permutation == np.arange(len(self.permutation))).all())


@dataclass(frozen=True)
class Alignment:
    """The aligned model (a new, norm-free SplitNet: batch norms folded; the suspect is
    unchanged) and what was undone."""

    model: SplitNet
    blocks: tuple[BlockAlignment, ...]

    def summary(self) -> dict:
        """JSON-ready: per unit, channels moved, scale range and the weakest match."""
        return {
            b.block: {
                "channels_moved": int((b.permutation != np.arange(len(b.permutation))).sum()),
                "scale_min": float(b.scales.min()),
                "scale_max": float(b.scales.max()),
                "min_similarity": float(b.correlation.min()),
            }
            for b in self.blocks
        }


def _next_layer(model: SplitNet, index: int) -> nn.Module:
    blocks = units(model)
    return blocks[index + 1][1].layer if index + 1 < len(blocks) else model.server.fc


def _columns(model: SplitNet, index: int) -> tuple[nn.Module, int]:
    """The layer fed by unit ``index`` and how many of its input columns each channel has
    (H*W when a conv block feeds a linear layer through the flatten, else 1)."""
    nxt, block = _next_layer(model, index), units(model)[index][1]
    if isinstance(nxt, nn.Linear) and isinstance(block, ConvBlock):
        return nxt, nxt.weight.shape[1] // block.layer.out_channels
    return nxt, 1


def _norm(model: SplitNet, index: int) -> nn.Module | None:
    return getattr(units(model)[index][1], "bn", None)


@torch.no_grad()
def permute_channels(model: SplitNet, index: int, permutation: torch.Tensor | np.ndarray) -> None:
    """In place: new channel j of unit ``index`` is old channel ``permutation[j]`` (layer
    row, bias, batch-norm entries); the next layer's inputs follow, so the function is unchanged."""
    perm = torch.as_tensor(np.asarray(permutation), dtype=torch.long)
    layer = units(model)[index][1].layer
    layer.weight.copy_(layer.weight[perm])
    if layer.bias is not None:
        layer.bias.copy_(layer.bias[perm])
    bn = _norm(model, index)
    if bn is not None:
        for tensor in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
            tensor.copy_(tensor[perm])
    nxt, per_channel = _columns(model, index)
    if isinstance(nxt, nn.Conv2d):
        nxt.weight.copy_(nxt.weight[:, perm])
    else:
        out_features = nxt.weight.shape[0]
        grouped = nxt.weight.view(out_features, len(perm), per_channel)
        nxt.weight.copy_(grouped[:, perm].reshape(out_features, -1))


def _positive(scales, count: int, dtype) -> torch.Tensor:
    s = torch.as_tensor(np.asarray(scales), dtype=dtype)
    if s.shape != (count,) or not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        raise InvalidInput(f"scales must be {count} finite positive numbers")
    return s


@torch.no_grad()
def scale_channels(model: SplitNet, index: int, scales: torch.Tensor | np.ndarray) -> None:
    """In place: multiply the output of channel c of unit ``index`` by ``scales[c] > 0``
    (the batch norm's weight and shift, or the layer's row and bias) and divide the next
    layer's input channel c by it, so the function is unchanged."""
    layer = units(model)[index][1].layer
    s = _positive(scales, layer.weight.shape[0], layer.weight.dtype)
    bn = _norm(model, index)
    if bn is not None:
        bn.weight.mul_(s)
        bn.bias.mul_(s)
    else:
        layer.weight.mul_(s.view((-1,) + (1,) * (layer.weight.dim() - 1)))
        if layer.bias is not None:
            layer.bias.mul_(s)
    nxt, per_channel = _columns(model, index)
    if isinstance(nxt, nn.Conv2d):
        nxt.weight.div_(s.view(1, -1, 1, 1))
    else:
        out_features = nxt.weight.shape[0]
        nxt.weight.copy_((nxt.weight.view(out_features, len(s), per_channel) / s.view(1, -1, 1)).reshape(out_features, -1))


@torch.no_grad()
def scale_before_norm(model: SplitNet, index: int, scales: torch.Tensor | np.ndarray) -> None:
    """In place: multiply row c of unit ``index``'s layer by ``scales[c] > 0`` and let its
    batch norm undo it (running mean times ``t``, ``var + eps`` times ``t^2``): the model
    computes the same function in evaluation mode, every weight of the layer moves.
    Only for units with a batch norm."""
    layer = units(model)[index][1].layer
    bn = _norm(model, index)
    if bn is None:
        raise InvalidInput(f"unit {units(model)[index][0]} has no batch norm to absorb a rescaling")
    t = _positive(scales, layer.weight.shape[0], layer.weight.dtype)
    layer.weight.mul_(t.view((-1,) + (1,) * (layer.weight.dim() - 1)))
    if layer.bias is not None:
        layer.bias.mul_(t)
    bn.running_mean.mul_(t)
    bn.running_var.copy_(t * t * (bn.running_var + bn.eps) - bn.eps)


@dataclass(frozen=True)
class ProbePass:
    """A suspect folded (:func:`~securemark.model.fold_batchnorm`: a new, norm-free model)
    and run once on the probe: its units' post-ReLU activations (what alignment compares)
    and its outputs (what a trace's checks read). :meth:`Aligner.align` re-aligns ``model``
    in place: a pass serves one alignment."""

    model: SplitNet
    activations: list[torch.Tensor]
    outputs: torch.Tensor


@torch.no_grad()
def probe_pass(suspect: SplitNet, probe: torch.Tensor) -> ProbePass:
    """``suspect`` folded and run on ``probe`` once (see :class:`ProbePass`); the suspect is
    not modified. Folding changes the outputs only by float rounding."""
    model = fold_batchnorm(suspect.cpu())
    activations, outputs = _forward(model, probe)
    return ProbePass(model, activations, outputs)


@torch.no_grad()
def _forward(model: SplitNet, probe: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Post-ReLU outputs of every unit on the probe, each as [C, N * positions] float64,
    and the model's outputs [N, classes], from one forward pass of a folded (norm-free)
    model. A unit's outputs do not change when earlier units are aligned (permuting a
    unit's channels permutes the next unit's inputs to match; a rescaling is absorbed by
    its batch norm), so they can all be read before any unit is aligned."""
    out, x = [], probe
    for _, block in units(model):
        if not isinstance(block, ConvBlock) and x.dim() > 2:  # the first dense block reads the flattened conv output
            x = x.flatten(1)
        a = block.pre_pool(x)
        out.append(a.transpose(0, 1).to(torch.float64, memory_format=torch.contiguous_format).reshape(a.shape[1], -1))  # one copy, not two
        x = block.pool(a) if isinstance(block, ConvBlock) else a  # a dense block's dropout: off in evaluation
    return out, model.server.fc(x.flatten(1))


def _activations(model: SplitNet, probe: torch.Tensor) -> list[torch.Tensor]:
    """The units' activations of :func:`_forward`."""
    return _forward(model, probe)[0]


def _columns_out(model: SplitNet) -> torch.Tensor:
    """The head's weights grouped by input channel of the last unit, [C, classes * positions]."""
    index = len(units(model)) - 1
    fc, per_channel = _columns(model, index)
    channels = fc.weight.shape[1] // per_channel
    return fc.weight.detach().view(fc.out_features, channels, per_channel).transpose(0, 1).reshape(channels, -1).to(torch.float64)


def _unit_rows(a: torch.Tensor, centre: bool) -> torch.Tensor:
    """The rows of ``a`` (centred first with ``centre``) scaled to unit norm; NaN or inf
    where a row is constant (:func:`_similarity` reads those as 0)."""
    if centre:
        a = a - a.mean(1, keepdim=True)
    return a / a.norm(dim=1, keepdim=True)


def _similarity(a: torch.Tensor, b: torch.Tensor, centre: bool, a_unit: torch.Tensor | None = None) -> np.ndarray:
    """Correlation (``centre``) or cosine of every row of ``a`` with every row of ``b``;
    0 where a row is constant. Both are blind to positive scaling of a row.
    ``a_unit``: ``_unit_rows(a, centre)`` when the caller keeps it (the reference's side)."""
    a_unit = _unit_rows(a, centre) if a_unit is None else a_unit
    if not centre:
        sim = a_unit @ _unit_rows(b, centre).T
    else:  # b's rows centred and scaled, without writing a centred copy of b (activations: [C, N * positions])
        mean = b.mean(1)
        norm = torch.linalg.vector_norm(b, dim=1)
        spread = (norm.square() - b.shape[1] * mean.square()).clamp_min(0.0).sqrt()
        spread = torch.where(spread > 1e-6 * norm, spread, 0.0)  # constant to rounding: 0, read as 0 below
        sim = (a_unit @ b.T - a_unit.sum(1, keepdim=True) * mean) / spread
    return torch.nan_to_num(sim, nan=0.0, posinf=0.0, neginf=0.0).numpy()


def _ratio(num: torch.Tensor, den: torch.Tensor) -> np.ndarray:
    num, den = num.numpy(), den.numpy()
    valid = (num > 0) & (den > 0) & np.isfinite(num) & np.isfinite(den)
    return np.where(valid, num / np.where(valid, den, 1.0), 1.0)


class Aligner:
    """Re-aligns suspects to one reference model (the vendor's base) on one probe batch.

    Everything that depends only on the reference is computed once, here: its folded
    weights, its units' activations on the probe and the *response metric* of every
    unit's layer, ``S = Sigma^(1/2)`` for the centred covariance ``Sigma`` of what the
    layer reads on the probe. Weight rows are compared through it (``W S``: the rows'
    responses on the data), so that weight noise in directions the data does not excite
    -- which changes nothing the model computes -- cannot mislead the matching or the
    scales.
    """

    def __init__(self, reference: SplitNet, probe: torch.Tensor) -> None:
        if not isinstance(probe, torch.Tensor) or probe.dim() != 4 or probe.shape[0] == 0:
            raise InvalidInput(f"probe must be a non-empty float tensor [N, 1, 28, 28], got {getattr(probe, 'shape', type(probe))}")
        self.reference = fold_batchnorm(reference.cpu())
        self.probe = probe.to(torch.float32)
        n_units = len(units(self.reference))
        self._metrics = [matrix_sqrt(input_covariance(self.reference, i, self.probe)) for i in range(n_units)]
        self._activations = _activations(self.reference, self.probe)
        self._rows = [_responses(self.reference, i, self._metrics[i]) for i in range(n_units)]
        self._head = _columns_out(self.reference)

    def tensors(self) -> dict[str, torch.Tensor]:
        """What depends only on the reference and the probe (for a safetensors file, so a
        later process skips the eigendecompositions; :meth:`from_tensors` reads it back).
        Activations are computed in float32 and stored so, exactly."""
        out = {"head": self._head.contiguous()}
        for i, (metric, activations, rows) in enumerate(zip(self._metrics, self._activations, self._rows)):
            out[f"metric.{i}"], out[f"activations.{i}"], out[f"rows.{i}"] = metric.contiguous(), activations.to(torch.float32).contiguous(), rows.contiguous()
        return out

    @classmethod
    def from_tensors(cls, reference: SplitNet, probe: torch.Tensor, tensors: dict[str, torch.Tensor]) -> "Aligner":
        """The aligner :meth:`tensors` saved for ``reference`` and ``probe`` (the same ones)."""
        aligner = cls.__new__(cls)
        aligner.reference = fold_batchnorm(reference.cpu())
        aligner.probe = probe.to(torch.float32)
        n_units = len(units(aligner.reference))
        try:
            aligner._metrics = [tensors[f"metric.{i}"] for i in range(n_units)]
            aligner._activations = [tensors[f"activations.{i}"].to(torch.float64) for i in range(n_units)]
            aligner._rows = [tensors[f"rows.{i}"] for i in range(n_units)]
            aligner._head = tensors["head"]
        except KeyError as exc:
            raise InvalidInput(f"aligner file lacks {exc}") from None
        return aligner

    @cached_property
    def _activation_units(self) -> list[torch.Tensor]:
        """The reference's activations centred and scaled to unit rows (the reference's side
        of every activation correlation, computed once for all suspects)."""
        return [_unit_rows(a, centre=True) for a in self._activations]

    @torch.no_grad()
    def align(self, suspect: SplitNet | ProbePass) -> "Alignment":
        """Undo channel permutations and positive rescalings of ``suspect`` (same
        architecture as the reference; not modified); returns a new, aligned, norm-free model.
        ``suspect`` may be its :func:`probe_pass` on this aligner's probe, when the caller
        has read its outputs already (the pass's folded model is then aligned in place).

        The suspect is first folded (:func:`~securemark.model.fold_batchnorm`). Then for
        each unit (the earlier ones already aligned), channel j of the reference is
        matched to suspect channel k by maximising, over permutations, the sum of
        similarities: activation correlation on the probe, cosine of the incoming rows'
        responses (``W S``), and for the last unit the cosine of the head's columns (its
        outputs are classes, never permuted). The scale is the ratio of the rows'
        response norms ``||W S||``: exact for a re-parametrisation, and blind to weight
        changes the data does not see.
        """
        probed = suspect if isinstance(suspect, ProbePass) else probe_pass(suspect, self.probe)
        model, activations = probed.model, probed.activations
        blocks = []
        n_units = len(units(model))
        for index, (path, _) in enumerate(units(model)):
            last = index == n_units - 1
            ref_rows, sus_rows = self._rows[index], _responses(model, index, self._metrics[index])
            sim = _similarity(self._activations[index], activations[index], centre=True, a_unit=self._activation_units[index])
            sim = sim + _similarity(ref_rows, sus_rows, centre=False)
            if last:
                sim = sim + _similarity(self._head, _columns_out(model), centre=False)
            perm = best_assignment(sim)
            scales = _ratio(sus_rows[perm].norm(dim=1), ref_rows.norm(dim=1))
            permute_channels(model, index, perm)
            scale_channels(model, index, 1.0 / scales)
            blocks.append(BlockAlignment(path, perm, scales, sim[np.arange(len(perm)), perm] / (3.0 if last else 2.0)))
        return Alignment(model, tuple(blocks))


def best_assignment(sim: np.ndarray) -> np.ndarray:
    """The permutation ``perm`` maximising ``sum_j sim[j, perm[j]]`` (a square similarity).

    When every row's best column is a different column, taking each row's best is optimal
    (no assignment can beat the sum of the row maxima) and costs one argmax: the usual case,
    a copy or a lightly changed model. Otherwise the Hungarian algorithm decides."""
    best = np.asarray(sim).argmax(axis=1)
    if len(np.unique(best)) == len(best):
        return best
    from scipy.optimize import linear_sum_assignment  # here, not at import: scipy.optimize costs ~0.3-0.8 s to load

    rows, cols = linear_sum_assignment(sim, maximize=True)
    return cols[np.argsort(rows)]


def _responses(model: SplitNet, index: int, metric: torch.Tensor) -> torch.Tensor:
    """The rows of unit ``index``'s layer through the response metric: ``W S``, [C, fan_in]."""
    layer = units(model)[index][1].layer
    return layer.weight.detach().flatten(1).to(torch.float64) @ metric


def align(suspect: SplitNet, reference: SplitNet, probe: torch.Tensor) -> Alignment:
    """Re-align ``suspect`` to ``reference`` on ``probe`` (see :class:`Aligner`; build one
    Aligner to align many suspects to the same reference)."""
    return Aligner(reference, probe).align(suspect)
