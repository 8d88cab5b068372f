"""The drift-whitened reading: read a suspect's fingerprint where leakers' updates move it least.

A leaker who fine-tunes, prunes or averages copies moves the fingerprinted readout
``phi`` (``[C_out, r]`` as a matrix) far more than the code word does: on this model one
epoch of fine-tuning moves it ~5x the norm of a copy's mark. That drift is not white. Its
energy sits in the layer's most excited input directions (the first columns carry ~35x the
mean) and is correlated across output units, because every update is a sum of gradient
outer products of the same data.

:class:`DriftModel` is a Kronecker model of that covariance, ``Cov(vec phi) ~ Sigma_c (x)
Sigma_r``, fitted to the readouts of the vendor's own simulated updates of its **base
model** on its own ``aux`` images (fine-tuning, pruning; never a copy, never a code word).
The whitened reading is ``y = K vec(Sigma_r^-1 Phi Sigma_c^-1)``: the matched filter of a
mark in that noise. Because the whitening depends only on the base model and vendor data,
an innocent customer's code word is independent of ``y`` and the distribution-free bound of
:mod:`securemark.scoring` holds unchanged.

The whitening trusts the simulated drift: a change no simulated update makes is not
weighted down. The plain reading is therefore kept beside it and a trace decides on both,
splitting epsilon (:func:`securemark.tracing.decoders.decide_readings`). Noise in the
directions the attacker's data does not excite reaches the readout as white noise, which no
whitening separates from a mark (docs/tracing.md "Known break"); :mod:`securemark.tracing.tamper`
detects it instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from securemark.errors import InvalidConfig, InvalidInput

__all__ = ["DriftModel", "fit_drift"]


@dataclass(frozen=True, eq=False)
class DriftModel:
    """Whitening of a ``[rows, cols]`` readout: ``phi -> vec(row_white @ Phi @ col_white)``.

    Attributes:
        row_white: float32 [rows, rows], the inverse of the (shrunk) row covariance.
        col_white: float32 [cols, cols], the inverse of the (shrunk) column covariance.
        samples: how many simulated updates it was fitted to.
        shrink: the shrinkage towards a scaled identity used for both covariances.
    """

    row_white: torch.Tensor
    col_white: torch.Tensor
    samples: int
    shrink: float

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.row_white.shape[0]), int(self.col_white.shape[0])

    def whiten(self, phi: torch.Tensor) -> torch.Tensor:
        """The whitened readout of a flat ``phi`` (same length, float64)."""
        rows, cols = self.shape
        if phi.numel() != rows * cols:
            raise InvalidInput(f"drift model expects a readout of {rows} x {cols} values, got {phi.numel()}")
        matrix = phi.to(torch.float64).reshape(rows, cols)
        return (self.row_white.to(torch.float64) @ matrix @ self.col_white.to(torch.float64)).reshape(-1)

    def tensors(self) -> dict[str, torch.Tensor]:
        """What :meth:`from_tensors` reads back (for a safetensors file)."""
        return {"row_white": self.row_white.contiguous(), "col_white": self.col_white.contiguous(),
                "samples": torch.tensor(self.samples), "shrink": torch.tensor(self.shrink, dtype=torch.float64)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "DriftModel":
        try:
            row, col = tensors["row_white"].to(torch.float32), tensors["col_white"].to(torch.float32)
            samples, shrink = int(tensors["samples"]), float(tensors["shrink"])
        except KeyError as exc:
            raise InvalidInput(f"drift model file lacks {exc}") from None
        if row.dim() != 2 or row.shape[0] != row.shape[1] or col.dim() != 2 or col.shape[0] != col.shape[1]:
            raise InvalidInput(f"drift model: expected square whitening matrices, got {list(row.shape)} and {list(col.shape)}")
        if not (torch.isfinite(row).all() and torch.isfinite(col).all()):
            raise InvalidInput("drift model: whitening matrices contain NaN or infinite values")
        return cls(row, col, samples, shrink)


def _shrunk_inverse(cov: np.ndarray, shrink: float) -> np.ndarray:
    """``((1 - s) S + s tr(S)/d I)^-1``, scaled to mean eigenvalue 1 (the reading's scale
    does not matter to the scorers; keeping it near 1 keeps the numbers readable)."""
    d = len(cov)
    scale = float(np.trace(cov)) / d
    if not scale > 0:
        raise InvalidInput("drift model: the simulated updates did not move the readout (zero covariance)")
    target = (1.0 - shrink) * cov / scale + shrink * np.eye(d)
    values, vectors = np.linalg.eigh((target + target.T) / 2)
    return (vectors / values.clip(min=1e-12)) @ vectors.T * float(values.clip(min=1e-12).mean())


def fit_drift(updates: np.ndarray | torch.Tensor, rows: int, shrink: float = 0.1, iterations: int = 3) -> DriftModel:
    """Fit the Kronecker drift model to simulated updates of the readout.

    ``updates``: float [n, rows * cols], the readouts of models the vendor made by updating
    its base model (each is already a difference from the base: ``Readout`` is centred on
    it). The two covariances are estimated by alternating ("flip-flop") maximum likelihood,
    each shrunk by ``shrink`` towards a scaled identity so that a few dozen updates give a
    well-conditioned estimate.
    """
    if not 0.0 < shrink <= 1.0:
        raise InvalidConfig(f"trace.drift_shrink must be in (0, 1], got {shrink}")
    data = np.asarray(updates.detach().cpu().numpy() if isinstance(updates, torch.Tensor) else updates, dtype=np.float64)
    if data.ndim != 2 or len(data) < 2 or data.shape[1] % rows:
        raise InvalidInput(f"drift model: need >= 2 updates of {rows} x cols values, got shape {data.shape}")
    if not np.all(np.isfinite(data)):
        raise InvalidInput("drift model: simulated updates contain NaN or infinite values")
    n, cols = len(data), data.shape[1] // rows
    mats = data.reshape(n, rows, cols)
    col_white = np.eye(cols)
    for _ in range(max(1, iterations)):
        row_cov = np.einsum("nrc,cd,nsd->rs", mats, col_white, mats, optimize=True) / (n * cols)
        row_white = _shrunk_inverse(row_cov, shrink)
        col_cov = np.einsum("nrc,rs,nsd->cd", mats, row_white, mats, optimize=True) / (n * rows)
        col_white = _shrunk_inverse(col_cov, shrink)
    return DriftModel(torch.as_tensor(row_white, dtype=torch.float32), torch.as_tensor(col_white, dtype=torch.float32), n, float(shrink))
