"""Obfuscation where the data does not look, detected (not traced).

Training moves a dense layer's weight only within the span of what the layer reads: every
gradient of ``W`` is a sum of ``delta x^T`` over the inputs ``x``. So fine-tuning,
averaging, pruning with recovery, permuting or rescaling (the alignment undoes the last
two) leave the share of the carrying layer's weight energy that lies *outside* the
directions the vendor's data excites about where the base model had it (measured: 0.99 to
1.08 x the base's, copies included; 90 % pruning with recovery 1.4 x). Noise put where the
attacker's own data is blind (the ``obfuscate`` attack, aimed at the drift-whitened reading)
multiplies it: 1.5 x at a noise norm of 1 x the weight's, 3.1 x at 3 x (docs/tracing.md "Known
break", ``benchmarks/off_data_check.py``).

A model trained independently also has a high share (its random initial weights there are
never trained away), but its readout is as far from the base model's as a model can be
(``Extractor.readout_change`` ~1.0, copies 0.2, fine-tuned coalitions 0.3-0.45): only an
*update of the base model* with a high share is reported as obfuscated
(``Extractor.obfuscated``). Such noise drowns the marks of an averaged coalition without
costing accuracy, so a trace that accuses no one is then **inconclusive**, not clean. The
finding names no one and does not enter the false-accusation bound.
"""

from __future__ import annotations

import torch

from securemark.errors import InvalidConfig

__all__ = ["off_data_basis", "off_data_energy", "OFF_DATA_NOTE"]

OFF_DATA_NOTE = ("the model is an update of the vendor's base model (its readout moved {moved:.2f}, relative) whose "
                 "fingerprinted layer ({layer}) holds {ratio:.2f} x the base's share of weight energy outside the directions "
                 "the vendor's data excites (training does not put it there; the limit is {limit:.2f} x): it was deliberately "
                 "obfuscated where data does not look, which can drown the marks of averaged copies, so no accusation here is "
                 "inconclusive, not a sign of innocence")


def off_data_basis(metric: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (float64 [fan_in, r]) of the input directions a response
    readout reads (its metric ``U_r Lambda_r^1/2``: the data's most excited directions)."""
    if metric.dim() != 2 or metric.shape[1] > metric.shape[0]:
        raise InvalidConfig(f"an off-data check needs a [fan_in, r] readout metric with r <= fan_in, got {list(metric.shape)}")
    basis, _ = torch.linalg.qr(metric.detach().to(torch.float64))
    return basis


def off_data_energy(weight: torch.Tensor, basis: torch.Tensor) -> float:
    """``||W (I - B B^T)|| / ||W B||``: the weight's energy outside the excited directions
    ``B`` relative to inside them (rows flattened to ``[C_out, fan_in]``). A common scale
    and the order of the rows leave it unchanged; per-row scales change the mix, which is
    why the trace measures it after alignment (which undoes them)."""
    rows = weight.detach().reshape(weight.shape[0], -1).to(torch.float64)
    if rows.shape[1] != basis.shape[0]:
        raise InvalidConfig(f"weight rows have {rows.shape[1]} inputs, the basis {basis.shape[0]}")
    inside = rows @ basis
    outside = rows - inside @ basis.T
    return float(outside.norm() / inside.norm().clamp_min(1e-30))
