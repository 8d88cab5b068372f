"""A certified figure beside the empirical one: Fisher information leakage (dFIL).

The owner sends ``z = client(x) + n`` with Gaussian noise ``n ~ N(0, s^2 I)``. The Fisher
information that ``z`` carries about the image ``x`` is ``I(x) = J(x)^T J(x) / s^2``,
with ``J`` the client's Jacobian at ``x``. By the Cramer-Rao bound, *any* unbiased
reconstruction ``x_hat(z)`` of the ``d`` = 784 pixels has

    E ||x_hat - x||^2 / d  >=  d / tr(I(x))  =  1 / dFIL(x),    dFIL(x) = tr(I(x)) / d

(Maeng et al., "Bounding the Invertibility of Privacy-preserving Instance Encoding
using Fisher Information", NeurIPS 2023, arXiv 2305.04146). The bound holds for every
attacker, trained or not, but only for unbiased ones: a decoder that leans on a prior
(the class-mean image) can go below it, which is why the empirical SSIM stays the
headline and this is reported beside it.

The defence's noise is relative (``sigma`` times the features' RMS, see
:func:`securemark.privacy.defence.add_noise`), so ``s`` is ``sigma`` times the RMS of the
sample's clean features. ``tr(J^T J)`` is the squared Frobenius norm of ``J``: exact (one
backward pass per output) for a flat cut, estimated with Gaussian probes
(Hutchinson: ``E ||J^T v||^2 = tr(J^T J)``) for a feature map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from securemark.errors import InvalidInput

EXACT_OUTPUTS = 256  # a cut with at most this many numbers per image gets the exact trace


@dataclass(frozen=True)
class FisherBound:
    """``dfil``: mean over the sample of ``tr(I(x)) / d`` (infinite without noise);
    ``mse_lower_bound``: ``1 / dfil``, a per-pixel MSE that no unbiased reconstruction
    beats on average over the images (each image's own bound is ``1 / dFIL(x)``, and the
    mean of those is at least ``1 / mean dFIL`` by Jensen's inequality; the mean of the
    per-image bounds itself is useless as a summary: an image whose features do not
    depend on it at all, every unit of a narrow cut switched off, has an infinite one);
    ``mse_lower_bound_median``: the median image's own bound; 0 without noise: nothing is
    certified. ``noise_std``: the absolute noise ``s``; ``exact``: whether ``tr(J^T J)``
    was computed, not estimated."""

    dfil: float
    mse_lower_bound: float
    noise_std: float
    exact: bool
    mse_lower_bound_median: float = 0.0

    def summary(self) -> dict[str, float | bool | None]:
        finite = lambda v: v if math.isfinite(v) else None  # noqa: E731
        return {"dfil": finite(self.dfil), "mse_lower_bound": self.mse_lower_bound, "mse_lower_bound_median": finite(self.mse_lower_bound_median),
                "noise_std": self.noise_std, "dfil_exact": self.exact}


def jacobian_norms(client: nn.Module, images: torch.Tensor, probes: int = 64, generator: torch.Generator | None = None,
                   batch: int = 100) -> tuple[torch.Tensor, bool]:
    """``||J(x)||_F^2`` per image (float64 [N]) of ``client`` in evaluation mode, and
    whether it is exact. Images are independent in evaluation mode (batch norms use
    their running statistics), so one backward pass of a batch's summed output gives
    every image's own gradient."""
    client.eval()
    out: list[torch.Tensor] = []
    exact = None
    for i in range(0, len(images), batch):
        x = images[i : i + batch].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            z = client(x).flatten(1)
            if exact is None:
                exact = z.shape[1] <= EXACT_OUTPUTS
            total = torch.zeros(len(x), dtype=torch.float64)
            directions = range(z.shape[1]) if exact else range(probes)
            for j in directions:
                if exact:
                    weights = torch.zeros_like(z)
                    weights[:, j] = 1.0
                else:
                    weights = torch.randn(z.shape, generator=generator, dtype=z.dtype)
                (grad,) = torch.autograd.grad(z, x, weights, retain_graph=True)
                total += grad.flatten(1).pow(2).sum(1).double()
            out.append(total if exact else total / probes)
    return torch.cat(out), bool(exact)


def fisher_bound(client: nn.Module, images: torch.Tensor, sigma: float, probes: int = 64, seed: int = 0) -> FisherBound:
    """dFIL of the features ``client`` sends for ``images`` (float [N, 1, 28, 28]) under
    the defence's relative noise ``sigma``, and the MSE bound it certifies."""
    if images.dim() != 4 or len(images) == 0:
        raise InvalidInput(f"fisher_bound needs images [N, 1, 28, 28], got {tuple(images.shape)}")
    client.eval()
    with torch.no_grad():
        rms = float(torch.cat([client(images[i : i + 500]).flatten(1) for i in range(0, len(images), 500)]).pow(2).mean().sqrt())
    d = images[0].numel()
    if sigma <= 0:
        return FisherBound(dfil=math.inf, mse_lower_bound=0.0, noise_std=0.0, exact=True)
    s = sigma * rms
    norms, exact = jacobian_norms(client, images, probes, torch.Generator().manual_seed(seed))
    dfil = norms / (s * s) / d
    mean = float(dfil.mean())
    median = float(dfil.median())
    return FisherBound(dfil=mean, mse_lower_bound=1.0 / mean if mean > 0 else math.inf, noise_std=s, exact=exact,
                       mse_lower_bound_median=1.0 / median if median > 0 else math.inf)
