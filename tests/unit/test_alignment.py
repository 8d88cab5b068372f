"""Re-alignment undoes channel permutations and positive rescalings of a model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from securemark.alignment import align, conv_blocks, permute_channels, scale_channels
from securemark.model import ModelSpec, build_model

SPEC = ModelSpec(widths=(4, 8, 16), cut=2)


@pytest.fixture(scope="module")
def probe() -> torch.Tensor:
    return torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def reparametrise(model, seed: int, scale: bool = True):
    """A random permutation of every block, and (optionally) random positive scales.

    Returns the model and, per block, what alignment must find: base channel j is played
    by suspect channel ``inverse[j]``, whose activations are ``scales[inverse[j]]`` times
    the base channel's."""
    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    truth = []
    for index, (_, block) in enumerate(conv_blocks(out)):
        n = block.conv.out_channels
        perm = torch.randperm(n, generator=g)
        permute_channels(out, index, perm)
        scales = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(-2, 2, generator=g)) if scale else torch.ones(n, dtype=torch.float64)
        scale_channels(out, index, scales)
        inverse = np.argsort(perm.numpy())
        truth.append((inverse, scales.numpy()[inverse]))
    return out, truth


@pytest.mark.parametrize("seed", range(5))
def test_alignment_recovers_a_random_permutation_and_scaling_exactly(seed, probe):
    base = build_model(SPEC, seed)
    suspect, truth = reparametrise(base, 100 + seed)
    with torch.no_grad():
        torch.testing.assert_close(suspect(probe), base(probe), rtol=1e-4, atol=1e-5)  # same function

    result = align(suspect, base, probe)

    for block, (perm, scales) in zip(result.blocks, truth):
        np.testing.assert_array_equal(block.permutation, perm)  # the exact permutation
        np.testing.assert_allclose(block.scales, scales, rtol=1e-4)
        assert block.correlation.min() > 0.499  # 1.0, or 0.5 for a dead channel (matched on weights alone)
    for key, value in base.state_dict().items():
        torch.testing.assert_close(result.model.state_dict()[key], value, rtol=1e-4, atol=1e-6)


def test_alignment_leaves_the_suspect_alone_and_is_identity_on_the_base(probe):
    base = build_model(SPEC, 1)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    result = align(base, base, probe)
    assert all(b.is_identity for b in result.blocks)
    for key, value in before.items():
        assert torch.equal(base.state_dict()[key], value)
        torch.testing.assert_close(result.model.state_dict()[key], value)
    assert set(result.summary()) == {"client.block1", "client.block2", "server.block3"}


def test_alignment_survives_small_weight_changes(probe):
    """After a permutation, a perturbation of the weights (like fine-tuning) still aligns."""
    base = build_model(SPEC, 2)
    suspect, truth = reparametrise(base, 7)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in suspect.parameters():
            p.add_(0.05 * p.std() * torch.randn(p.shape, generator=g))
    result = align(suspect, base, probe)
    for block, (perm, _) in zip(result.blocks, truth):
        np.testing.assert_array_equal(block.permutation, perm)


def test_scale_channels_rejects_non_positive_scales():
    model = build_model(SPEC, 0)
    with pytest.raises(ValueError, match="positive"):
        scale_channels(model, 0, np.array([1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="probe"):
        align(model, model, torch.zeros(0, 1, 28, 28))
