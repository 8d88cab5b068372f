"""Re-alignment undoes channel permutations and positive rescalings of a model, batch
norms and dense blocks included."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from securemark.alignment import Aligner, align, permute_channels, scale_before_norm, scale_channels, units
from securemark.errors import InvalidInput
from securemark.model import ModelSpec, build_model, fold_batchnorm

SPECS = {
    "batch-norm": ModelSpec(widths=(4, 8, 16), hidden=(12,), cut=2, norm="batch"),
    "no-norm": ModelSpec(widths=(4, 8, 16), hidden=(12,), cut=2, norm="none"),
}


@pytest.fixture(scope="module")
def probe() -> torch.Tensor:
    return torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def trained_like(spec: ModelSpec, seed: int):
    """A fresh model whose batch norms hold non-trivial statistics and affine terms (as
    after training), in evaluation mode."""
    model = build_model(spec, seed)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for _, block in units(model):
            bn = getattr(block, "bn", None)
            if bn is not None:
                bn.running_mean.uniform_(-0.5, 0.5, generator=g)
                bn.running_var.uniform_(0.5, 2.0, generator=g)
                bn.weight.uniform_(0.5, 1.5, generator=g)
                bn.bias.uniform_(-0.2, 0.2, generator=g)
    return model.eval()


def reparametrise(model, seed: int, scale: bool = True):
    """A random permutation of every unit, random positive output scales and (with a
    batch norm) random scales the norm absorbs.

    Returns the model and, per unit, what alignment must find: base channel j is played
    by suspect channel ``inverse[j]``, whose output is ``scales[inverse[j]]`` times the
    base channel's."""
    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    truth = []
    for index, (_, block) in enumerate(units(out)):
        n = block.layer.weight.shape[0]
        perm = torch.randperm(n, generator=g)
        permute_channels(out, index, perm)
        scales = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(-2, 2, generator=g)) if scale else torch.ones(n, dtype=torch.float64)
        scale_channels(out, index, scales)
        if hasattr(block, "bn"):
            scale_before_norm(out, index, torch.exp(torch.empty(n, dtype=torch.float64).uniform_(-2, 2, generator=g)))
        inverse = np.argsort(perm.numpy())
        truth.append((inverse, scales.numpy()[inverse]))
    return out.eval(), truth


@pytest.mark.parametrize("norm", SPECS)
@pytest.mark.parametrize("seed", range(5))
def test_alignment_recovers_a_random_permutation_and_scaling_exactly(norm, seed, probe):
    base = trained_like(SPECS[norm], seed)
    suspect, truth = reparametrise(base, 100 + seed)
    with torch.no_grad():
        torch.testing.assert_close(suspect(probe), base(probe), rtol=1e-4, atol=1e-5)  # same function

    result = align(suspect, base, probe)

    for block, (perm, scales) in zip(result.blocks, truth):
        np.testing.assert_array_equal(block.permutation, perm)  # the exact permutation
        np.testing.assert_allclose(block.scales, scales, rtol=1e-4)
        assert block.correlation.min() > 0.499  # 1.0, or 0.5 for a dead channel (matched on weights alone)
    folded = fold_batchnorm(base).state_dict()
    for key, value in folded.items():  # the same folded weights as the base: every re-parametrisation undone
        torch.testing.assert_close(result.model.state_dict()[key], value, rtol=1e-4, atol=1e-5)


def test_folding_keeps_the_function(probe):
    base = trained_like(SPECS["batch-norm"], 3)
    folded = fold_batchnorm(base)
    assert not folded.spec.normed and not any(hasattr(b, "bn") for _, b in units(folded))
    with torch.no_grad():
        torch.testing.assert_close(folded(probe), base(probe), rtol=1e-4, atol=1e-5)


def test_alignment_leaves_the_suspect_alone_and_is_identity_on_the_base(probe):
    base = trained_like(SPECS["batch-norm"], 1)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    result = align(base, base, probe)
    assert all(b.is_identity for b in result.blocks)
    for key, value in before.items():
        assert torch.equal(base.state_dict()[key], value)
    for key, value in fold_batchnorm(base).state_dict().items():
        torch.testing.assert_close(result.model.state_dict()[key], value)
    assert set(result.summary()) == {"client.block1", "client.block2", "server.block3", "server.dense1"}


def test_alignment_survives_small_weight_changes(probe):
    """After a permutation, a perturbation of the weights (like fine-tuning) still aligns."""
    base = trained_like(SPECS["batch-norm"], 2)
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * p.std() * torch.randn(p.shape, generator=g))
    suspect, truth = reparametrise(tuned, 7)
    result = align(suspect, base, probe)
    for block, (perm, _) in zip(result.blocks, truth):
        np.testing.assert_array_equal(block.permutation, perm)


def test_scale_channels_rejects_non_positive_scales():
    model = build_model(SPECS["batch-norm"], 0)
    with pytest.raises(InvalidInput, match="positive"):
        scale_channels(model, 0, np.array([1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(InvalidInput, match="probe"):
        align(model, model, torch.zeros(0, 1, 28, 28))
    with pytest.raises(InvalidInput, match="batch norm"):
        scale_before_norm(build_model(SPECS["no-norm"], 0), 0, np.ones(4))


def test_a_saved_aligner_aligns_exactly_like_a_fresh_one(probe, tmp_path):
    """The vendor persists the reference side of alignment (securemark.vendor): read back
    from a safetensors file, it must give the same aligned model, bit for bit."""
    from safetensors.torch import load_file, save_file

    base = trained_like(SPECS["batch-norm"], 4)
    suspect, _ = reparametrise(base, 11)
    fresh = Aligner(base, probe)
    save_file(fresh.tensors(), str(tmp_path / "aligner.safetensors"))
    loaded = Aligner.from_tensors(base, probe, load_file(str(tmp_path / "aligner.safetensors")))
    a, b = fresh.align(suspect), loaded.align(suspect)
    for (key, value), other in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(value, other), key
    with pytest.raises(InvalidInput, match="lacks"):
        Aligner.from_tensors(base, probe, {})


def test_activation_correlation_matches_the_centred_definition_and_reads_constant_rows_as_zero():
    from securemark.alignment import _similarity, _unit_rows

    g = torch.Generator().manual_seed(3)
    a = torch.rand(6, 5000, generator=g, dtype=torch.float64) * 3 + 1
    b = torch.relu(torch.randn(5, 5000, generator=g, dtype=torch.float64) + 0.5)
    b[1] = 0.0  # a dead channel
    b[3] = 2.5  # a constant, non-zero channel: centred, it is all zeros
    explicit = torch.nan_to_num(_unit_rows(a, True) @ _unit_rows(b, True).T, nan=0.0, posinf=0.0, neginf=0.0).numpy()
    sim = _similarity(a, b, centre=True)
    assert np.allclose(sim, explicit, atol=1e-12)
    assert (sim[:, 1] == 0).all() and (sim[:, 3] == 0).all()
    assert np.allclose(_similarity(a, b, centre=True, a_unit=_unit_rows(a, True)), sim, atol=0)


@pytest.mark.parametrize("name", ["batch-norm", "no-norm"])
def test_one_probe_pass_gives_the_outputs_and_the_same_alignment(name, probe):
    """A trace runs the suspect on the probe once (securemark.vendor: its outputs for the
    checks, its activations for alignment): the pass's outputs are the model's, and
    aligning through it gives the model alignment gives without it, bit for bit."""
    from securemark.alignment import probe_pass

    base = trained_like(SPECS[name], 5)
    suspect, _ = reparametrise(base, 12)
    before = copy.deepcopy(suspect.state_dict())
    probed = probe_pass(suspect, probe)
    with torch.no_grad():
        assert torch.allclose(probed.outputs, suspect.eval()(probe), atol=1e-5, rtol=1e-5)
    aligner = Aligner(base, probe)
    direct, through = aligner.align(suspect), aligner.align(probed)
    for (key, value), other in zip(direct.model.state_dict().items(), through.model.state_dict().values()):
        assert torch.equal(value, other), key
    assert all(torch.equal(v, suspect.state_dict()[k]) for k, v in before.items())  # the suspect is not modified
