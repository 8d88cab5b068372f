"""The vendor's recipe: its schedule, its augmentation, and training that is a function
of the generator alone (dropout included)."""

from __future__ import annotations

import pytest
import torch

from securemark.errors import ConfigError
from securemark.model import ModelSpec, build_model
from securemark.training import Recipe, augment, one_cycle, train_with_recipe


def test_one_cycle_warms_up_then_decays_to_zero():
    f = one_cycle(100, 0.25)
    assert f(0) == pytest.approx(0.04) and f(25) == pytest.approx(1.0)
    assert f(60) < f(40) < 1.0 and f(100) == pytest.approx(0.0, abs=1e-12) and f(150) == pytest.approx(0.0, abs=1e-12)
    tiny = one_cycle(2, 0.25)  # any step count works
    assert [round(tiny(s), 3) for s in range(3)] == [0.04, 1.0, 0.0]


def test_augment_is_a_crop_or_flip_of_each_image_and_seeded():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(64, 1, 28, 28, generator=g)
    a = augment(images, torch.Generator().manual_seed(1))
    b = augment(images, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == images.shape
    assert not torch.equal(a, images)
    # every output pixel is a pixel of the (flipped) input or zero padding
    assert set(torch.unique(a).tolist()) <= set(torch.unique(images).tolist()) | {0.0}


@pytest.mark.parametrize("bad, key", [({"epochs": 0}, "train.epochs"), ({"schedule": "step"}, "train.schedule"),
                                       ({"label_smoothing": 1.0}, "train.label_smoothing"), ({"warmup": 0.0}, "train.warmup")])
def test_bad_recipes_name_their_key(bad, key):
    with pytest.raises(ConfigError) as info:
        Recipe(**bad)
    assert info.value.key == key


def test_training_with_dropout_depends_on_the_generator_only():
    spec = ModelSpec(widths=(4, 8), hidden=(8,), cut=1, dropout=0.5)
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(96, 1, 28, 28, generator=g), torch.randint(0, 10, (96,), generator=g)
    recipe = Recipe(epochs=2, batch_size=32, augment=True)
    a = train_with_recipe(build_model(spec, 1), images, labels, recipe, torch.Generator().manual_seed(5))
    torch.manual_seed(999)  # whatever the global stream holds
    state = torch.random.get_rng_state()
    b = train_with_recipe(build_model(spec, 1), images, labels, recipe, torch.Generator().manual_seed(5))
    assert torch.equal(state, torch.random.get_rng_state())  # and it is left as it was
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


@pytest.mark.parametrize("size", [28, 14, 7])
def test_the_fast_pool_gives_max_pool2ds_outputs_and_leaves_training_to_it(size):
    """MaxPool2x2 without a gradient (every evaluation): the same values as max_pool2d, an
    odd row and column dropped like it; with one, max_pool2d itself (same gradients)."""
    from securemark.model import MaxPool2x2

    x = torch.relu(torch.randn(8, 4, size, size, generator=torch.Generator().manual_seed(size)))
    x[0, 0, 0, :2] = 3.0  # a tie inside a window
    x[1, 1, 2, 2] = float("nan")
    fast, reference = MaxPool2x2(), torch.nn.MaxPool2d(2)
    with torch.no_grad():
        got, want = fast(x), reference(x)
    assert got.shape == want.shape == (8, 4, size // 2, size // 2)
    assert torch.equal(got.nan_to_num(-1.0), want.nan_to_num(-1.0))
    assert torch.isnan(got).sum() == torch.isnan(want).sum() == 1
    xs = [x.nan_to_num(0.0).clone().requires_grad_() for _ in range(2)]
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(1))
    fast(xs[0]).backward(g)
    reference(xs[1]).backward(g)
    assert torch.equal(xs[0].grad, xs[1].grad)
