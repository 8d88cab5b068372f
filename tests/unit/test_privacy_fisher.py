"""The certified figure: dFIL of a linear client with Gaussian noise has a closed form,
``tr(I) = tr(A^T A) / s^2``, and the bound is ``d / tr(I)``."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from securemark.errors import InvalidInput
from securemark.privacy.fisher import EXACT_OUTPUTS, fisher_bound

D = 28 * 28


class Linear(nn.Module):
    """``z = A vec(x)`` for a fixed matrix ``A`` [k, 784]."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.a.T


def closed_form(client: Linear, images: torch.Tensor, sigma: float) -> tuple[float, float]:
    with torch.no_grad():
        rms = float(client(images).pow(2).mean().sqrt())
    s = sigma * rms
    trace = float(client.a.double().pow(2).sum()) / (s * s)
    return trace / D, D / trace  # dFIL, bound (the same for every image: J = A)


@pytest.mark.parametrize("k", [16, EXACT_OUTPUTS + 200])  # exact trace, then Hutchinson's estimate
def test_dfil_of_a_linear_client_matches_the_closed_form(k):
    a = torch.randn(k, D, generator=torch.Generator().manual_seed(k)) / math.sqrt(D)
    client, images = Linear(a), torch.rand(20, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    dfil, bound = closed_form(client, images, 0.5)
    got = fisher_bound(client, images, 0.5, probes=400)
    tolerance = 1e-4 if got.exact else 0.1  # Hutchinson's estimate: relative error ~ sqrt(2 / probes) per image, averaged over 20
    assert got.exact == (k <= EXACT_OUTPUTS)
    assert got.dfil == pytest.approx(dfil, rel=tolerance)
    assert got.mse_lower_bound == pytest.approx(bound, rel=tolerance)


def test_more_noise_certifies_more_error_and_no_noise_certifies_nothing():
    client = Linear(torch.randn(8, D, generator=torch.Generator().manual_seed(0)) / 28)
    images = torch.rand(10, 1, 28, 28)
    low, high = fisher_bound(client, images, 0.5), fisher_bound(client, images, 1.0)
    assert high.mse_lower_bound == pytest.approx(4 * low.mse_lower_bound, rel=1e-4)  # bound ~ s^2
    none = fisher_bound(client, images, 0.0)
    assert none.mse_lower_bound == 0.0 and none.summary()["dfil"] is None


def test_images_the_features_ignore_do_not_make_the_bound_infinite():
    """A ReLU client that is off for half the images sends nothing that depends on them;
    the reported bound is ``1 / mean dFIL`` (finite, below the mean of the per-image
    bounds), and the median image's own bound is reported beside it."""
    a = torch.randn(8, D, generator=torch.Generator().manual_seed(2)) / 28

    class Gated(Linear):
        def forward(self, x):
            on = (x.flatten(1).mean(1, keepdim=True) > 0).to(x.dtype)  # all-negative images switch every unit off
            return super().forward(x) * on

    images = torch.cat([torch.rand(10, 1, 28, 28), -torch.rand(10, 1, 28, 28)])
    got = fisher_bound(Gated(a), images, 0.5)
    with torch.no_grad():
        rms = float(Gated(a)(images).pow(2).mean().sqrt())
    dfil_on = float(a.double().pow(2).sum()) / (0.5 * rms) ** 2 / D
    assert got.dfil == pytest.approx(dfil_on / 2, rel=1e-4)
    assert got.mse_lower_bound == pytest.approx(2 / dfil_on, rel=1e-4) and math.isfinite(got.mse_lower_bound)
    assert got.mse_lower_bound_median >= got.mse_lower_bound


def test_the_bound_refuses_what_is_not_a_batch_of_images():
    with pytest.raises(InvalidInput):
        fisher_bound(Linear(torch.zeros(2, D)), torch.rand(28, 28), 0.5)
