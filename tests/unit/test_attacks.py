"""Attacks: every registered attack returns a new model and leaves its inputs alone;
each attack does what it claims (exact averages, pruning rate, quantisation error...)."""

from __future__ import annotations

import copy

import math

import pytest
import torch

from securemark import attacks
import securemark.attacks.tuning  # noqa: F401  (the module whose embed the fallback test replaces)
from securemark.attacks import AttackData, available_attacks, create_attack
from securemark.errors import InvalidConfig, InvalidInput, UnknownName
from securemark.fingerprint import EmbeddingFailed
from securemark.model import ModelSpec, SplitNet, build_model
from securemark.training import train_epochs

SPEC = ModelSpec(widths=(4, 8), hidden=(8,), cut=1)

# A small, fast config per registered attack (every attack must have one: see below).
CONFIGS: dict[str, dict] = {
    "fine_tune": {"fraction": 0.5, "epochs": 1, "batch_size": 64},
    "prune": {"rate": 0.5, "recovery_epochs": 1, "batch_size": 64},
    "average": {"weights": "random"},
    "quantize": {"bits": 4},
    "noise": {"scale": 0.1},
    "overwrite": {"code_length": 16, "margin": 0.02, "max_steps": 50},
    "retrain": {"layers": 2, "epochs": 1, "batch_size": 64},
    "permute": {"blocks": 0},
    "rescale": {"spread": 8.0},
    "compose": {"steps": [{"attack": "average"}, {"attack": "fine_tune", "epochs": 1, "batch_size": 64}, {"attack": "prune", "rate": 0.3}]},
    "distill": {"labels": "soft", "epochs": 2, "batch_size": 64},
    "obfuscate": {"directions": 3, "scale": 2.0, "samples": 64},
    "serve_coalition": {"mode": "vote"},
    "query_filter": {"detector": "distance", "refuse": 0.1, "fallback": "alone", "epochs": 1},
    "invariance": {"family": "blocks", "epochs": 1, "batch_size": 64},
    "purify": {"method": "denoiser", "epochs": 1, "width": 4, "adapt_epochs": 1},
}
SERVING = {"serve_coalition", "query_filter", "purify"}  # answer through an API: a module without readable weights


@pytest.fixture(scope="module")
def data() -> AttackData:
    g = torch.Generator().manual_seed(0)
    return AttackData(torch.rand(200, 1, 28, 28, generator=g), torch.randint(0, 10, (200,), generator=g))


@pytest.fixture
def models() -> list[SplitNet]:
    return [build_model(SPEC, seed) for seed in (1, 2, 3)]


def snapshot(model: SplitNet) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def conv_linear_weights(model: SplitNet) -> torch.Tensor:
    return torch.cat([m.weight.detach().reshape(-1) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))])


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_every_registered_attack_has_a_test_config():
    assert set(CONFIGS) == set(available_attacks())


@pytest.mark.parametrize("name", sorted(set(available_attacks()) - SERVING))
def test_every_attack_returns_a_new_model_and_leaves_its_inputs_alone(name, models, data):
    attack = create_attack(name, **CONFIGS[name])
    before = [snapshot(m) for m in models]
    images_before, labels_before = data.images.clone(), data.labels.clone()

    out = attack(models, data, gen(5))

    assert isinstance(out, SplitNet) and all(out is not m for m in models)
    input_storage = {p.data_ptr() for m in models for p in m.parameters()}
    assert not any(p.data_ptr() in input_storage for p in out.parameters())  # no shared tensors
    for m, state in zip(models, before):
        assert same_state(snapshot(m), state)
    assert torch.equal(data.images, images_before) and torch.equal(data.labels, labels_before)

    assert list(out.state_dict()) == list(models[0].state_dict())  # same layout as a copy
    assert not same_state(snapshot(out), before[0])  # the attack did something
    logits = out(data.images[:16])
    assert logits.shape == (16, 10) and torch.isfinite(logits).all()
    assert isinstance(attack.name, str) and attack.name
    assert isinstance(attack.strength, float) and math.isfinite(attack.strength)

    again = attack(models, data, gen(5))  # reproducible from the generator alone
    assert same_state(snapshot(again), snapshot(out))


@pytest.mark.parametrize("name", sorted(SERVING))
def test_serving_attacks_answer_like_a_model_without_weights_to_read(name, models, data):
    before = [snapshot(m) for m in models]
    out = create_attack(name, **CONFIGS[name])(models, data, gen(5))
    assert out.spec is None and not isinstance(out, SplitNet)
    logits = out(data.images[:16])
    assert logits.shape == (16, 10) and torch.isfinite(logits).all()
    assert all(same_state(snapshot(m), state) for m, state in zip(models, before))
    again = create_attack(name, **CONFIGS[name])(models, data, gen(5))
    assert torch.equal(again(data.images[:16]).argmax(1), logits.argmax(1))  # reproducible from the generator


def test_a_coalition_api_answers_from_its_members():
    members = [build_model(SPEC, seed) for seed in (1, 2, 3)]
    images = torch.rand(64, 1, 28, 28, generator=gen(1))
    answers = torch.stack([m.eval()(images).argmax(1) for m in members])
    routed = create_attack("serve_coalition", mode="random")(members, AttackData(images, answers[0]), gen(2))(images).argmax(1)
    assert ((routed[None] == answers).any(0)).all()  # every answer is some member's
    vote = create_attack("serve_coalition", mode="vote")(members, AttackData(images, answers[0]), gen(2))(images).argmax(1)
    majority = (answers[0] == answers[1]) | (answers[0] == answers[2])
    assert torch.equal(vote[majority], answers[0][majority])


def test_a_query_filter_refuses_about_what_it_was_tuned_to_on_the_attackers_images(models):
    g = gen(3)
    images = torch.rand(400, 1, 28, 28, generator=g)
    data = AttackData(images, models[0].eval()(images).argmax(1))
    for detector in ("softmax", "distance"):
        api = create_attack("query_filter", detector=detector, refuse=0.1, fallback="second")(models, data, gen(4))
        assert 0.05 <= float(api.unusual(images).float().mean()) <= 0.15
        flagged = api.unusual(images)
        top2 = models[0].eval()(images).topk(2, dim=1).indices
        assert torch.equal(api(images).argmax(1)[flagged], top2[flagged, 1])  # flagged: the runner-up label


def test_a_query_filter_reuses_the_fallback_network_it_would_train_again(models, data):
    first = create_attack("query_filter", **{**CONFIGS["query_filter"], "detector": "softmax"})(models, data, gen(6))
    trained = create_attack("query_filter", **CONFIGS["query_filter"])(models, data, gen(6))
    reused = create_attack("query_filter", **CONFIGS["query_filter"], alone=first.fallback)(models, data, gen(6))
    assert reused.fallback is first.fallback
    assert same_state(snapshot(trained.fallback), snapshot(reused.fallback))  # the same network, trained once
    assert torch.equal(trained(data.images[:64]), reused(data.images[:64]))
    with pytest.raises(InvalidConfig, match="alone"):
        create_attack("query_filter", detector="distance", fallback="second", alone=first.fallback)


def test_random_blocks_blend_a_binary_block_pattern_of_the_drawn_size():
    from securemark.attacks.invariance import random_blocks

    images = torch.zeros(64, 1, 28, 28)
    out = random_blocks(images, gen(1), (4, 4), (0.5, 0.5))
    assert set(out.unique().tolist()) <= {0.0, 0.5}  # 0.5 x image (0) + 0.5 x {0, 1}
    assert torch.equal(out[:, :, ::7, ::7].repeat_interleave(7, 2).repeat_interleave(7, 3), out)  # 4 x 4 cells of 7 pixels
    varied = random_blocks(torch.rand(64, 1, 28, 28, generator=gen(2)), gen(3), (2, 14), (0.2, 0.6))
    assert varied.min() >= 0 and varied.max() <= 1


@pytest.mark.parametrize("family", ["blocks", "mixup", "boundary"])
def test_invariance_training_is_reproducible_and_changes_the_copy(family, models, data):
    out = create_attack("invariance", family=family, epochs=1, batch_size=64)(models, data, gen(5))
    again = create_attack("invariance", family=family, epochs=1, batch_size=64)(models, data, gen(5))
    assert same_state(snapshot(out), snapshot(again)) and not same_state(snapshot(out), snapshot(models[0]))
    assert create_attack("invariance", family=family).name == f"invariance_{family}"


def test_boundary_invariance_trains_on_the_images_the_copy_is_least_sure_of(models, data):
    from securemark.attacks.invariance import _least_sure

    model = models[0]
    probs = model.eval()(data.images).softmax(1)
    top2 = probs.topk(2, dim=1).values
    picked = _least_sure(model, data.images, 0.1)
    assert len(picked) == round(0.1 * len(data.images)) and model.training  # back in train mode
    ratio = top2[:, 1] / top2[:, 0]
    rest = torch.ones(len(ratio), dtype=torch.bool)
    rest[picked] = False
    assert ratio[picked].min() >= ratio[rest].max()  # the least sure first, as the vendor ranks its candidates
    model.eval()


def test_pca_purifier_keeps_the_attackers_images_and_removes_what_is_outside_their_span(models):
    g = gen(6)
    basis = torch.linalg.qr(torch.randn(784, 8, generator=g)).Q  # the attacker's images live in 8 directions
    images = (0.5 + 0.05 * (torch.randn(300, 8, generator=g) @ basis.T)).reshape(-1, 1, 28, 28)
    data = AttackData(images, torch.randint(0, 10, (300,), generator=g))
    api = create_attack("purify", method="pca", components=8)(models, data, gen(7))
    assert torch.allclose(api.purifier(images), images, atol=1e-4)
    off = torch.randn(1, 784, generator=g)
    off = off - (off @ basis) @ basis.T  # orthogonal to the data's span
    bumped = (images[:1] + 0.1 * (off / off.norm()).reshape(1, 1, 28, 28))
    assert torch.allclose(api.purifier(bumped), images[:1], atol=1e-4)
    assert torch.equal(api(images[:8]).argmax(1), models[0].eval()(api.purifier(images[:8])).argmax(1))


def test_unknown_attack_lists_the_valid_names():
    with pytest.raises(UnknownName) as err:
        create_attack("gaussian_blur")
    for name in available_attacks():
        assert name in str(err.value)


def test_unknown_parameter_lists_the_accepted_ones():
    with pytest.raises(InvalidConfig, match=r"unknown option.*'ratio'.*accepted.*'rate'"):
        create_attack("prune", ratio=0.5)


@pytest.mark.parametrize(
    "name, cfg",
    [
        ("fine_tune", {"fraction": 0.0}),
        ("fine_tune", {"optimizer": "lbfgs"}),
        ("fine_tune", {"epochs": 1.5}),
        ("prune", {"rate": 1.5}),
        ("prune", {"lr": -1.0}),
        ("average", {"weights": "softmax"}),
        ("quantize", {"bits": 1}),
        ("noise", {"scale": -0.1}),
        ("noise", {"scale": float("nan")}),
        ("overwrite", {"layer": "client.block1.conv.weight"}),
        ("overwrite", {"code_length": 0}),
        ("retrain", {"layers": 0}),
        ("retrain", {"layers": "client"}),
        ("compose", {"steps": []}),
        ("compose", {"steps": [{"attack": "prune", "rate": 2.0}]}),
        ("compose", {"steps": [{"rate": 0.5}]}),
        ("invariance", {"family": "stripes"}),
        ("invariance", {"cells": [14, 2]}),
        ("invariance", {"blend": [0.2]}),
        ("purify", {"method": "blur"}),
        ("purify", {"components": 0}),
        ("purify", {"adapt_epochs": -1}),
    ],
)
def test_invalid_config_is_the_projects_error_naming_the_key(name, cfg):
    with pytest.raises(InvalidConfig) as err:
        create_attack(name, **cfg)
    key = next(iter(cfg))
    assert key in str(err.value) or "step" in str(err.value)


def test_attack_data_is_checked():
    with pytest.raises(InvalidInput, match="images"):
        AttackData(torch.rand(4, 28, 28), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(InvalidInput, match="labels"):
        AttackData(torch.rand(4, 1, 28, 28), torch.zeros(4, dtype=torch.int32))
    with pytest.raises(InvalidInput, match="as many"):
        AttackData(torch.rand(4, 1, 28, 28), torch.zeros(3, dtype=torch.int64))


def constant_model(value: float) -> SplitNet:
    model = build_model(SPEC, 0)
    with torch.no_grad():
        for t in model.state_dict().values():  # parameters and batch-norm statistics
            if t.is_floating_point():
                t.fill_(value)
    return model


def test_uniform_average_is_exact(data):
    attack = create_attack("average")
    out = attack([constant_model(1.0), constant_model(3.0)], data, gen())
    for value in out.state_dict().values():
        if value.is_floating_point():
            assert torch.equal(value, torch.full_like(value, 2.0))
    assert attack.strength == 2.0


def test_random_average_is_the_convex_combination_of_its_weights(models, data):
    attack = create_attack("average", weights="random")
    out = attack(models, data, gen(9))
    w = attack.mixing_weights(len(models), gen(9))  # the draw the attack made
    assert w.shape == (3,) and torch.all(w > 0) and math.isclose(float(w.sum()), 1.0, abs_tol=1e-12)
    assert not torch.allclose(w, torch.full_like(w, 1 / 3), atol=1e-3)
    states = [m.state_dict() for m in models]
    for key, value in out.state_dict().items():
        expected = sum(float(wi) * s[key].double() for wi, s in zip(w, states))
        torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-6)
    assert attack.strength == 3.0


def test_average_refuses_different_architectures(data):
    with pytest.raises(ValueError, match="architecture"):
        create_attack("average")([build_model(SPEC, 0), build_model(ModelSpec(widths=(4, 8, 8), cut=2), 0)], data, gen())


@pytest.mark.parametrize("rate, recovery", [(0.3, 0), (0.7, 0), (0.6, 1)])
def test_pruning_hits_its_rate(rate, recovery, models, data):
    out = create_attack("prune", rate=rate, recovery_epochs=recovery, batch_size=64)([models[0]], data, gen())
    w = conv_linear_weights(out)
    assert abs(float((w == 0).float().mean()) - rate) < 0.01
    assert not any(hasattr(m, "weight_orig") for m in out.modules())  # no prune re-parametrisation left
    if recovery == 0:
        original = conv_linear_weights(models[0])
        kept = w != 0
        assert original[~kept].abs().max() <= original[kept].abs().min()  # the smallest went
        assert torch.equal(w[kept], original[kept])
        for (k, before), after in zip(models[0].state_dict().items(), out.state_dict().values()):
            if k.endswith("bias"):
                assert torch.equal(before, after)  # biases are not pruned
    else:
        assert not torch.equal(w[w != 0], conv_linear_weights(models[0])[w != 0])  # recovery trained


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_error_is_at_most_half_a_step(bits, models, data):
    out = create_attack("quantize", bits=bits)([models[0]], data, gen())
    levels = 2 ** (bits - 1) - 1
    for key, before in models[0].state_dict().items():
        after = out.state_dict()[key]
        scale = before.abs().max() / levels
        assert (after - before).abs().max() <= scale / 2 + 1e-6 * scale
        assert len(torch.unique(after)) <= 2 * levels + 1


def test_noise_has_the_relative_standard_deviation(models, data):
    scale = 0.3
    out = create_attack("noise", scale=scale)([models[0]], data, gen())
    checked = 0
    for key, before in models[0].named_parameters():  # parameters only: statistics are not weights
        delta = dict(out.named_parameters())[key].detach() - before.detach()
        if before.std(correction=0) == 0 and before.numel() > 1:  # a constant tensor (fresh norm shift): no spread, no noise
            continue
        assert torch.all(delta != 0)
        if before.numel() >= 250:
            ratio = float(delta.std() / before.std(correction=0))
            assert abs(ratio - scale) < 0.1 * scale, (key, ratio)
            assert abs(float(delta.mean())) < 0.2 * float(delta.std())
            checked += 1
    assert checked >= 2


def test_retrain_server_leaves_the_client_alone(models, data):
    attack = create_attack("retrain", layers="server", epochs=1, batch_size=64)
    out = attack([models[0]], data, gen())
    for key, before in models[0].state_dict().items():
        after = out.state_dict()[key]
        assert torch.equal(before, after) == key.startswith("client."), key  # frozen client: its statistics too
    assert attack.strength == 3.0  # block2.conv, dense1.linear and fc


def test_retrain_last_layer_changes_only_that_layer(models, data):
    attack = create_attack("retrain", layers=1, epochs=1, batch_size=64)
    out = attack([models[0]], data, gen())
    for key, before in models[0].state_dict().items():
        assert torch.equal(before, out.state_dict()[key]) == (not key.startswith("server.fc.")), key
    assert all(p.requires_grad for p in out.parameters())
    with pytest.raises(InvalidConfig, match="only 4"):
        create_attack("retrain", layers=5)([models[0]], data, gen())


def test_compose_applies_its_steps_in_order(models, data):
    steps = [{"attack": "average"}, {"attack": "quantize", "bits": 4}, {"attack": "prune", "rate": 0.5}]
    composed = create_attack("compose", steps=steps)
    out = composed(models, data, gen(3))

    g = gen(3)
    manual = create_attack("average")(models, data, g)
    manual = create_attack("quantize", bits=4)([manual], data, g)
    manual = create_attack("prune", rate=0.5)([manual], data, g)
    assert same_state(snapshot(out), snapshot(manual))

    swapped = create_attack("compose", steps=[steps[0], steps[2], steps[1]])(models, data, gen(3))
    assert not same_state(snapshot(swapped), snapshot(out))  # order matters
    assert composed.name == "average>quantize>prune"
    assert composed.strength == 0.5


def test_overwrite_falls_back_to_the_trained_model_when_embedding_fails(models, data, monkeypatch):
    partly_trained = copy.deepcopy(models[0])

    def failing_embed(*args, **kwargs):
        raise EmbeddingFailed("budget ran out", model=partly_trained, steps=20)

    monkeypatch.setattr(attacks.tuning, "embed", failing_embed)
    out = create_attack("overwrite", code_length=16, max_steps=20)([models[0]], data, gen())
    assert out is partly_trained  # the attacker keeps what embed trained


@pytest.mark.parametrize("config", [{"attack": "permute"}, {"attack": "permute", "blocks": 1}, {"attack": "rescale", "spread": 100.0}])
def test_reparametrisations_keep_predictions(config, models, data):
    name = config.pop("attack")
    out = create_attack(name, **config)(models[:1], data, gen(3))
    with torch.no_grad():
        before, after = models[0].eval()(data.images), out(data.images)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    assert torch.equal(after.argmax(1), before.argmax(1))
    changed = [k for k, v in out.state_dict().items() if not torch.equal(v, models[0].state_dict()[k])]
    assert "client.block1.conv.weight" in changed


def test_permute_only_moves_weights(models, data):
    out = create_attack("permute")(models[:1], data, gen(4))
    for key, value in models[0].state_dict().items():  # same multiset of values per tensor
        torch.testing.assert_close(out.state_dict()[key].flatten().sort().values, value.flatten().sort().values, rtol=0, atol=0)


@pytest.mark.parametrize("labels", ["soft", "hard"])
def test_distilled_student_is_fresh_and_imitates_its_teacher(labels, models):
    g = gen(11)  # a learnable task: the class is the strongest of ten fixed projections of the image
    images = torch.rand(400, 1, 28, 28, generator=g)
    classes = (images.flatten(1) @ torch.randn(784, 10, generator=g)).argmax(1)
    data = AttackData(images, classes)
    teacher = train_epochs(copy.deepcopy(models[0]), images, classes, 6, gen(12), lr=3e-3, batch_size=32)
    student = create_attack("distill", labels=labels, alpha=1.0, epochs=8, batch_size=32)([teacher], data, gen(4))
    assert student.spec == teacher.spec
    t, s = snapshot(teacher), snapshot(student)
    assert all(not torch.equal(t[k], s[k]) for k in t if k.endswith("weight"))  # no weight of the copy survives
    with torch.no_grad():
        agree = float((student.eval()(data.images).argmax(1) == teacher.eval()(data.images).argmax(1)).float().mean())
        share = float(torch.bincount(teacher(data.images).argmax(1), minlength=10).max()) / len(data)
    assert agree > max(0.3, share)  # it learnt the teacher's answers, not just its most common one


def test_distilling_into_another_architecture(models, data):
    attack = create_attack("distill", labels="hard", student="other", widths=[3, 6], hidden=[5], epochs=1, batch_size=64)
    student = attack([models[0]], data, gen(2))
    assert student.spec.widths == (3, 6) and student.spec.hidden == (5,)
    assert attack.name == "distill_hard_other"
    assert student(data.images[:4]).shape == (4, 10)
    with pytest.raises(InvalidConfig, match="widths"):
        create_attack("distill", student="other")


def test_obfuscation_moves_weights_far_and_predictions_little(models):
    g = gen(3)
    coarse = torch.rand(300, 1, 7, 7, generator=g)  # smooth images: some patch directions are barely excited
    images = torch.nn.functional.interpolate(coarse, size=28, mode="bilinear", align_corners=False)
    data = AttackData(images, torch.randint(0, 10, (300,), generator=g))
    model = models[0].eval()
    out = create_attack("obfuscate", directions=3, scale=5.0, layers=["server.block2"])([model], data, gen(4))
    w0, w1 = model.server.block2.conv.weight, out.server.block2.conv.weight
    assert float((w1 - w0).norm() / w0.norm()) == pytest.approx(5.0, rel=1e-4)
    with torch.no_grad():
        before, after = model(images), out(images)
    assert float((after - before).norm() / before.norm()) < 0.1  # the function barely moved
    assert torch.equal(out.client.block1.conv.weight, model.client.block1.conv.weight)
    with pytest.raises(InvalidConfig, match="unknown layers"):
        create_attack("obfuscate", layers=["server.nope"])([model], data, gen())
