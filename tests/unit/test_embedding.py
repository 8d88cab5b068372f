"""Batched issuing (securemark.embedding) on a tiny model and a synthetic feature bank:
every word embeds, a batch gives the copies one-at-a-time embedding gives, the restore
phase is what makes a strict accuracy tolerance reachable, failures name the customer."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from securemark.embedding import CarrierSpace, Job, changes_only_carrier, copy_accuracy, embed_batch, supports
from securemark.errors import InvalidConfig, InvalidInput
from securemark.fingerprint import EmbedConfig, Readout, bit_error_rate, carrier_inputs, extract
from securemark.key import projection
from securemark.model import ModelSpec, build_model, forward_from, unit_index

SPEC = ModelSpec(widths=(4, 8), hidden=(32,), cut=1)
LAYER = "server.dense1.linear.weight"
CODE_LENGTH = 64
SECRET = bytes(range(32))
KEYS = 16
CFG = EmbedConfig(layer=LAYER, rank=16, subspace=48, margin=0.5, lr=3e-3, batch_size=64, check_every=10, max_steps=1500,
                  accuracy_tolerance=0.02, eval_rows=500, train_rows=1500, key_weight=0.5, key_agreement=0.9, key_confidence=0.6,
                  natural_check=0.5)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py


def smooth_images(n: int, seed: int) -> torch.Tensor:
    coarse = torch.rand(n, 1, 7, 7, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=28, mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def world():
    """A base model trained a little on a teacher's labels, its bank (client outputs),
    clean "aux" rows, key views, a readout and a key: what a CarrierSpace is built from."""
    client_model = build_model(SPEC, 2).eval()
    teacher = build_model(SPEC, 1).eval()
    images = smooth_images(2600, 0)
    with torch.no_grad():
        features = client_model.client(images)
        logits = teacher.server(features)
        labels = (logits - logits.mean(0)).argmax(1)
    model = build_model(SPEC, 2)
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)  # dropout: the base must not depend on earlier tests
    optimizer = torch.optim.Adam(model.server.parameters(), lr=1e-2)
    for _ in range(300):
        idx = torch.randint(2000, (128,), generator=g)
        loss = F.cross_entropy(model.server(features[idx]), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    base = model.eval()
    bank_x = carrier_inputs(base, LAYER, features[:2000])
    aux_x = carrier_inputs(base, LAYER, features[2000:2400])
    test_x, test_y = carrier_inputs(base, LAYER, features[2400:]), labels[2400:]
    with torch.no_grad():
        key_x = carrier_inputs(base, LAYER, base.client(0.6 * smooth_images(KEYS, 5) + 0.4 * (smooth_images(1, 6) > 0.5).float()))
    readout = Readout.build("response", base, LAYER, smooth_images(256, 9), rank=CFG.rank)
    key_matrix = projection(SECRET, LAYER, CODE_LENGTH, readout.features(base).numel())
    return dict(base=base, bank=(bank_x, labels[:2000]), aux=(aux_x, labels[2000:2400]), test=(test_x, test_y), keys=key_x,
                readout=readout, key_matrix=key_matrix)


def space_for(world, cfg: EmbedConfig = CFG, keys: bool = True) -> CarrierSpace:
    extra = dict(key_inputs=world["keys"], key_index=torch.arange(KEYS), key_original=torch.ones(KEYS, dtype=torch.bool)) if keys else {}
    return CarrierSpace.build(world["base"], world["readout"], world["key_matrix"], *world["bank"], cfg, split_seed=11,
                              natural_inputs=world["aux"][0], natural_labels=world["aux"][1], **extra)


def jobs(count: int, keys: bool = True, start: int = 0) -> list[Job]:
    rng = np.random.default_rng(0)
    words = [(rng.integers(0, 2, CODE_LENGTH).astype(np.uint8), torch.as_tensor(rng.integers(0, 10, KEYS))) for _ in range(start + count)]
    return [Job(f"customer-{i}", bits, labels if keys else None, seed=100 + i) for i, (bits, labels) in enumerate(words)][start:]


@pytest.fixture(scope="module")
def space(world) -> CarrierSpace:
    return space_for(world)


@pytest.fixture(scope="module")
def batch(space):
    return jobs(4), embed_batch(space, jobs(4), CFG)


def test_every_word_is_embedded_with_both_marks(batch, space, world):
    todo, outcomes = batch
    assert [o.name for o in outcomes] == [j.name for j in todo]
    for job, outcome in zip(todo, outcomes):
        assert outcome.error is None, outcome.error
        result = outcome.result
        y = extract(result.model, world["readout"], world["key_matrix"])  # the trace's own reading of the full model
        assert bit_error_rate(y, job.bits) == 0.0
        assert result.min_margin >= CFG.margin
        assert result.key_agreement >= CFG.key_agreement
        assert result.bank_accuracy >= space.base_accuracy - CFG.accuracy_tolerance
        assert 0 < result.mark_steps <= result.steps and result.mark_steps % CFG.check_every == 0  # marked at a check, then restored
        index = unit_index(result.model, "server.dense1")
        answers = forward_from(result.model, index, world["keys"]).argmax(1)
        assert float((answers == job.key_labels).double().mean()) >= CFG.key_agreement


def test_copies_differ_and_the_base_is_untouched(batch, space, world):
    _, outcomes = batch
    weights = [o.result.model.server.dense1.linear.weight for o in outcomes]
    assert not torch.allclose(weights[0], weights[1])
    assert torch.equal(world["base"].server.dense1.linear.weight, space.base.server.dense1.linear.weight)
    changed = weights[0] - space.w0
    inside = changed @ space.basis @ space.basis.T
    assert torch.allclose(changed, inside, atol=1e-5)  # a copy changes the layer only inside the shared subspace


def test_a_batch_gives_the_copies_one_at_a_time_gives(batch, space):
    todo, outcomes = batch
    for job, together in list(zip(todo, outcomes))[:2]:
        (alone,) = embed_batch(space, [job], CFG)
        assert alone.result.steps == together.result.steps
        for (name, a), b in zip(alone.result.model.state_dict().items(), together.result.model.state_dict().values()):
            assert torch.allclose(a, b, atol=1e-4), name


def test_a_rolling_batch_gives_the_same_copies_whenever_a_customer_joins(batch, space):
    """width 2 over 4 jobs: the last two join as the first two finish (at a check, on
    their own step count), and every copy is the one the full batch made."""
    todo, outcomes = batch
    joined = []
    rolling = embed_batch(space, todo, CFG, progress=joined.append, width=2)
    assert sum(joined) == len(todo) and [o.name for o in rolling] == [j.name for j in todo]
    for late, together in zip(rolling, outcomes):
        assert late.result.steps == together.result.steps
        for (name, a), b in zip(late.result.model.state_dict().items(), together.result.model.state_dict().values()):
            assert torch.equal(a, b), name
    with pytest.raises(InvalidInput, match="width"):
        embed_batch(space, todo, CFG, width=0)


def test_copy_accuracy_is_the_full_models_accuracy(batch, space, world):
    _, outcomes = batch
    model = outcomes[0].result.model
    test_x, test_y = world["test"]
    direct = float((forward_from(model, unit_index(model, "server.dense1"), test_x).argmax(1) == test_y).double().mean())
    assert copy_accuracy(space, model, space.project(test_x), test_y) == pytest.approx(direct, abs=1e-9)
    base_direct = float((forward_from(space.base, unit_index(space.base, "server.dense1"), test_x).argmax(1) == test_y).double().mean())
    assert copy_accuracy(space, space.base, space.project(test_x), test_y) == pytest.approx(base_direct, abs=1e-9)


def test_changes_only_carrier_tells_an_issued_copy_from_a_changed_one(batch, space):
    # the fast accuracy is exact only for an issued copy: anything changed since must take the slow path
    _, outcomes = batch
    issued = outcomes[0].result.model
    assert changes_only_carrier(space, issued) and changes_only_carrier(space, space.base)
    changed = [("client", lambda m: next(m.client.parameters()).add_(1e-4)),
               ("running mean", lambda m: m.server.dense1.bn.running_mean.add_(1e-4)),
               ("outside the basis", lambda m: m.server.dense1.linear.weight.add_(1e-3 * torch.randn(m.server.dense1.linear.weight.shape,
                                                                                                  generator=torch.Generator().manual_seed(0))))]
    for what, change in changed:
        model = copy.deepcopy(issued)
        with torch.no_grad():
            change(model)
        assert not changes_only_carrier(space, model), what
    assert not changes_only_carrier(space, build_model(ModelSpec(widths=(4, 8), hidden=(16,), cut=1), 0))


def test_restore_phase_reaches_a_strict_tolerance_that_keeping_the_base_alone_misses(world):
    """Once both marks hold, keeping the base's answers (KL, the mark phase's objective)
    random-walks around the base's accuracy and often misses the tolerance within the
    budget (what failed customer-0016 on main); the restore phase optimises the
    accuracy itself and gets every word there, well within the same budget."""
    capped = dataclasses.replace(CFG, max_steps=600)
    restored = embed_batch(space_for(world, capped), jobs(6), capped)
    assert all(o.error is None for o in restored), [str(o.error) for o in restored if o.error]
    assert max(o.result.steps for o in restored) <= 400
    kl_only = embed_batch(space_for(world, capped), jobs(6), dataclasses.replace(capped, restore_weight=0.0))
    assert sum(o.error is not None for o in kl_only) >= 2


def test_a_word_that_cannot_be_embedded_is_named_with_what_was_short(space):
    capped = dataclasses.replace(CFG, max_steps=1)
    outcomes = embed_batch(space, jobs(2), capped)
    for outcome in outcomes:
        assert outcome.result is None
        message = str(outcome.error)
        assert message.startswith(outcome.name) and "min margin" in message and "keys answered" in message and "accuracy" in message


def test_weights_only_batches_work_without_keys(world):
    space = space_for(world, keys=False)
    outcomes = embed_batch(space, jobs(2, keys=False), CFG)
    assert all(o.error is None and o.result.key_agreement is None and o.result.ber == 0.0 for o in outcomes)


def test_natural_views_are_trained_on_for_the_trained_on_images_only(world, space):
    """Views of the vendor's clean images (fingerprint.natural_views) join the trained-on
    rows with their image's label; a view of a checked image never does, or the accuracy
    check would read images the copy was taught."""
    aux_x, aux_y = world["aux"]
    view = aux_x + 1000.0 * torch.arange(1, len(aux_x) + 1)[:, None]  # row i's view is told apart by its offset
    with_views = CarrierSpace.build(world["base"], world["readout"], world["key_matrix"], *world["bank"], CFG, split_seed=11,
                                    natural_inputs=aux_x, natural_labels=aux_y, natural_views=[view])
    n_trained = len(aux_x) - int(len(aux_x) * CFG.natural_check)
    assert len(with_views.train) == len(space.train) + n_trained
    assert torch.equal(with_views.check_labels, space.check_labels)
    nearest = lambda rows, among: torch.cdist(rows, among).argmin(1)  # noqa: E731 (which image a projected row is)
    checked = nearest(with_views.check.sub[-(len(aux_x) - n_trained):], with_views.project(aux_x).sub)
    viewed = nearest(with_views.train.sub[-n_trained:], with_views.project(view).sub)
    assert len(set(viewed.tolist())) == n_trained and not set(viewed.tolist()) & set(checked.tolist())
    assert torch.equal(with_views.train_labels[-n_trained:], aux_y[viewed])


def test_mixed_or_mismatched_jobs_are_refused(space, world):
    with pytest.raises(Exception, match="black-box"):
        embed_batch(space, jobs(1, keys=False), CFG)
    short = Job("x", np.zeros(CODE_LENGTH - 1, dtype=np.uint8), torch.zeros(KEYS, dtype=torch.long), 1)
    with pytest.raises(Exception, match="bits"):
        embed_batch(space, [short], CFG)


def test_only_the_last_dense_layer_with_a_norm_is_batched(world):
    assert supports(world["base"], LAYER)
    assert not supports(world["base"], "server.block2.conv.weight")
    with pytest.raises(InvalidConfig, match="last dense block"):
        space_for(world, dataclasses.replace(CFG, layer="server.block2.conv.weight"))


def test_a_saved_carrier_space_issues_the_same_copies(batch, space, world, tmp_path):
    """The vendor persists the carrier space without its key matrix (securemark.vendor):
    read back under the same key, it must issue the same copies, bit for bit."""
    from safetensors.torch import load_file, save_file

    save_file(space.tensors(), str(tmp_path / "carrier.safetensors"))
    loaded = CarrierSpace.from_tensors(load_file(str(tmp_path / "carrier.safetensors")), SPEC, LAYER, world["key_matrix"])
    assert loaded.base_accuracy == space.base_accuracy and loaded.unit == space.unit
    todo, outcomes = batch
    (again,) = embed_batch(loaded, todo[:1], CFG)
    assert again.result.steps == outcomes[0].result.steps
    for (name, a), b in zip(again.result.model.state_dict().items(), outcomes[0].result.model.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(InvalidInput, match="carrier space file"):
        CarrierSpace.from_tensors({}, SPEC, LAYER, world["key_matrix"])


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_every_gradient_precision_issues_copies_that_pass_the_float32_checks(world, precision):
    """The hinge's gradient may run in bfloat16 (fingerprint.gradient_precision); the marks
    and the accuracy are still checked in float32, so every copy meets them either way."""
    cfg = dataclasses.replace(CFG, gradient_precision=precision)
    space = space_for(world, cfg)
    for job, outcome in zip(jobs(2), embed_batch(space, jobs(2), cfg)):
        assert outcome.error is None, outcome.error
        y = extract(outcome.result.model, world["readout"], world["key_matrix"])
        assert bit_error_rate(y, job.bits) == 0.0 and outcome.result.min_margin >= cfg.margin
        assert copy_accuracy(space, outcome.result.model, space.check, space.check_labels) >= space.base_accuracy - cfg.accuracy_tolerance


def test_an_unknown_gradient_precision_is_refused():
    from securemark.errors import ConfigError

    with pytest.raises(ConfigError, match="gradient_precision"):
        dataclasses.replace(CFG, gradient_precision="float16")


def test_the_per_customer_adam_is_torchs_adam_for_each_customer():
    """Customers at different step counts share one update (securemark.embedding._Adam):
    each must move exactly as torch's Adam would move it alone."""
    from securemark.embedding import _Adam, _Params

    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (3,), (3,), (5, 3), (5,)]
    start = [[torch.randn(s, generator=g) for s in shapes] for _ in range(2)]
    alone = [[t.clone().requires_grad_(True) for t in ts] for ts in start]
    optimizers = [torch.optim.Adam(ts, lr=1e-2) for ts in alone]
    adam = _Adam(1e-2)
    params = _Params(*(t[None].clone() for t in start[0]))  # customer 0 trains alone for two steps
    state, counts = adam.init(params), torch.tensor([0])
    for step in range(5):
        if step == 2:  # customer 1 joins, as _Batch.join adds a row: fresh moments, its own count
            fresh = _Params(*(t[None].clone() for t in start[1]))
            params = _Params(*(torch.cat([a, b]) for a, b in zip(params.tensors(), fresh.tensors())))
            state = [(torch.cat([m, torch.zeros_like(t)]), torch.cat([v, torch.zeros_like(t)])) for (m, v), t in zip(state, fresh.tensors())]
            counts = torch.cat([counts, torch.tensor([0])])
        grads = tuple(torch.randn((len(counts),) + s, generator=g) for s in shapes)
        counts += 1
        adam.step(params, state, grads, counts)
        for i in range(len(counts)):
            for t, grad in zip(alone[i], grads):
                t.grad = grad[i].clone()
            optimizers[i].step()
    assert counts.tolist() == [5, 3]
    for i in range(2):
        for t, ref in zip(params.tensors(), alone[i]):
            assert torch.allclose(t[i], ref.detach(), rtol=1e-6, atol=1e-7)
