"""The obfuscation check: training (fine-tuning, averaging, pruning, re-parametrising)
keeps a model's off-data weight energy near the base model's; noise where the data does
not look multiplies it. Real Fashion-MNIST slices, a small model trained for the test."""

from __future__ import annotations

import pytest
import torch

from securemark import data as fmnist
from securemark.attacks import create_attack
from securemark.attacks.base import AttackData
from securemark.errors import InvalidConfig
from securemark.fingerprint import Readout
from securemark.model import ModelSpec, build_model
from securemark.tracing import Extractor, off_data_basis, off_data_energy
from securemark.training import Recipe, train_with_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = ModelSpec(widths=(8, 16), hidden=(64,), cut=1)
LAYER = "server.dense1.linear.weight"
LIMIT = 1.25  # the test model is small: its natural updates stay within 1.01 x, noise at 1x gives 1.5 x


@pytest.fixture(scope="module")
def setting(raw_dataset):
    arrays = fmnist.load(raw_dataset)
    x = arrays.train_images[:3000].float().div(255).unsqueeze(1)
    y = arrays.train_labels[:3000]
    base = build_model(SPEC, 0)
    train_with_recipe(base, x[:2000], y[:2000], Recipe(epochs=3, batch_size=64, lr=3e-3), torch.Generator().manual_seed(0))
    base.eval()
    probe = x[2000:2400]  # the vendor's probe images
    extractor = Extractor(SPEC, Readout.build("response", base, LAYER, probe, 32), torch.zeros(1, 64 * 32), base, probe, off_data_limit=LIMIT)
    attacker = AttackData(x[2400:3000], y[2400:3000])  # the attacker's own images
    return extractor, attacker


def ratio(extractor, model) -> float:
    return extractor.off_data_ratio(extractor.aligned(model)[0])


def test_the_base_model_is_at_one(setting):
    extractor, _ = setting
    assert ratio(extractor, extractor.reference) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("attack, options", [
    ("fine_tune", {"epochs": 2}),
    ("fine_tune", {"epochs": 2, "optimizer": "sgd", "lr": 0.01}),
    ("prune", {"rate": 0.5}),
    ("permute", {}),
    ("rescale", {"spread": 100.0}),
])
def test_natural_updates_are_not_flagged(setting, attack, options):
    extractor, attacker = setting
    model = create_attack(attack, **options)([extractor.reference], attacker, torch.Generator().manual_seed(1))
    r = ratio(extractor, model)
    assert r < LIMIT and not extractor.obfuscated(extractor.aligned(model)[0]), r


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_noise_where_the_data_does_not_look_is_flagged(setting, scale):
    extractor, attacker = setting
    noise = create_attack("obfuscate", layers=["server.dense1"], directions=64, scale=scale, samples=600)
    model = noise([extractor.reference], attacker, torch.Generator().manual_seed(2))
    tuned = create_attack("fine_tune", epochs=1)([model], attacker, torch.Generator().manual_seed(3))  # and fine-tuned after
    assert ratio(extractor, model) > LIMIT and ratio(extractor, tuned) > LIMIT
    assert extractor.obfuscated(extractor.aligned(tuned)[0])


def test_the_energy_ignores_row_scale_and_order():
    g = torch.Generator().manual_seed(0)
    basis = off_data_basis(torch.randn(20, 5, generator=g))
    weight = torch.randn(6, 20, generator=g, dtype=torch.float64)
    same = (weight * torch.rand(6, 1, generator=g, dtype=torch.float64).add(0.1))[torch.randperm(6, generator=g)]
    assert off_data_energy(same, basis) != pytest.approx(off_data_energy(weight, basis))  # rows scaled unevenly change the mix ...
    assert off_data_energy(weight * 7.0, basis) == pytest.approx(off_data_energy(weight, basis))  # ... a common scale does not
    assert off_data_energy(weight[torch.randperm(6, generator=g)], basis) == pytest.approx(off_data_energy(weight, basis))
    with pytest.raises(InvalidConfig):
        off_data_energy(torch.randn(6, 21, dtype=torch.float64), basis)
    with pytest.raises(InvalidConfig):
        off_data_basis(torch.randn(3, 5))
