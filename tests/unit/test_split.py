"""Split training on synthetic tensors: dCor, shapes at the cut, the server's message
gate, the schedule and its replay, the transport registry and seeded initialisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from securemark.errors import ConfigError, UnknownName
from securemark.model import ModelSpec, SplitNet, build_client, build_model, build_server
from securemark.privacy.defence import DefenceConfig, distance_correlation
from securemark.split.messages import MessageRejected, SmashedBatch
from securemark.split.parties import SplitServer
from securemark.split.protocol import InMemoryOwners, SplitJob, TrainConfig, bank_positions
from securemark.split.transport import create_transport, transport_names

SMALL = ModelSpec(widths=(4, 8), hidden=(8,), cut=1)


def numpy_dcor(x: np.ndarray, z: np.ndarray) -> float:
    """Szekely et al. (2007) sample distance correlation, written out plainly."""

    def centred(a: np.ndarray) -> np.ndarray:
        d = np.sqrt(((a[:, None, :] - a[None, :, :]) ** 2).sum(-1))
        return d - d.mean(0, keepdims=True) - d.mean(1, keepdims=True) + d.mean()

    a, b = centred(x.reshape(len(x), -1)), centred(z.reshape(len(z), -1))
    return math.sqrt((a * b).mean() / math.sqrt((a * a).mean() * (b * b).mean()))


# ----------------------------------------------------------------- distance correlation
def test_dcor_of_a_variable_with_itself_and_its_affine_image_is_one():
    x = torch.randn(40, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert distance_correlation(x, x).item() == pytest.approx(1.0, abs=1e-6)
    assert distance_correlation(x, 2.5 * x + 3.0).item() == pytest.approx(1.0, abs=1e-6)


def test_dcor_matches_a_hand_computed_value():
    x = np.array([[0.0, 1.0], [1.0, 0.5], [2.0, -1.0], [0.3, 0.3], [-1.0, 2.0], [4.0, 0.0]])
    z = np.array([[1.0], [0.0], [2.5], [-0.5], [1.5], [0.2]])
    expected = numpy_dcor(x, z)
    assert 0.05 < expected < 0.95  # a non-trivial value, not an end point
    got = distance_correlation(torch.from_numpy(x), torch.from_numpy(z)).item()
    assert got == pytest.approx(expected, abs=1e-6)
    got32 = distance_correlation(torch.from_numpy(x).float(), torch.from_numpy(z).float()).item()
    assert got32 == pytest.approx(expected, abs=1e-5)


def test_dcor_of_independent_samples_is_small_and_dependent_is_large():
    g = torch.Generator().manual_seed(1)
    x, z = torch.randn(500, 3, generator=g), torch.randn(500, 3, generator=g)
    assert distance_correlation(x, z).item() < 0.2
    assert distance_correlation(x, x**2).item() > 0.3  # uncorrelated but dependent


def test_dcor_is_differentiable():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(32, 1, 6, 6, generator=g)
    z = torch.randn(32, 4, 3, 3, generator=g, requires_grad=True)
    value = distance_correlation(x, z)
    assert value.requires_grad
    value.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


# ----------------------------------------------------------------- shapes at the cut
@pytest.mark.parametrize(
    "widths, cut",
    [((16, 32, 64), 1), ((16, 32, 64), 2), ((16, 32, 64), 3), ((8,), 1), ((4, 8, 16, 32), 4), ((4, 8, 16, 32), 2)],
)
@pytest.mark.parametrize("hidden", [(), (12,), (12, 6)])
@pytest.mark.parametrize("norm", ["batch", "none"])
def test_client_output_has_the_cut_shape_and_the_net_gives_ten_logits(widths, cut, hidden, norm):
    spec = ModelSpec(widths=widths, hidden=hidden, cut=cut, norm=norm)
    x = torch.rand(5, 1, 28, 28)
    assert tuple(build_client(spec)(x).shape[1:]) == spec.cut_shape
    assert spec.cut_shape[0] == widths[cut - 1]
    assert build_server(spec)(torch.rand(5, *spec.cut_shape)).shape == (5, 10)
    assert SplitNet(spec)(x).shape == (5, 10)
    names = set(SplitNet(spec).state_dict())
    assert ("client.block1.bn.running_var" in names) == (norm == "batch")
    assert ("client.block1.conv.bias" in names) == (norm == "none")  # a norm's shift replaces the bias
    assert {f"server.dense{i + 1}.linear.weight" for i in range(len(hidden))} <= names


@pytest.mark.parametrize(
    "widths, cut, key",
    [((16, 32), 0, "model.cut"), ((16, 32), 3, "model.cut"), ((4, 8, 16, 32, 64), 2, "model.widths"), ((), 1, "model.widths")],
)
def test_model_spec_rejects_impossible_architectures(widths, cut, key):
    with pytest.raises(ConfigError) as info:
        ModelSpec(widths=widths, cut=cut)
    assert info.value.key == key and key in str(info.value)
    for bad, named in [(dict(norm="layer"), "model.norm"), (dict(dropout=1.0), "model.dropout"), (dict(hidden=(0,)), "model.hidden")]:
        with pytest.raises(ConfigError) as info:
            ModelSpec(**bad)
        assert info.value.key == named


def test_a_bottleneck_ends_the_client_and_only_its_width_crosses():
    spec = ModelSpec(widths=(4, 8), hidden=(16, 8), cut=2, bottleneck=5)
    net = build_model(spec, seed=0).eval()
    x = torch.rand(6, 1, 28, 28)
    assert spec.cut_shape == (5,) and net.client(x).shape == (6, 5) and net(x).shape == (6, 10)
    assert "client.neck.linear.weight" in net.state_dict() and net.server.dense1.linear.in_features == 5
    assert ModelSpec(**spec.to_dict()) == spec
    assert "bottleneck" not in ModelSpec().to_dict()  # specs saved before the option read back unchanged
    with pytest.raises(ConfigError) as info:
        ModelSpec(widths=(4, 8), cut=1, bottleneck=5)  # a flat cut needs every conv block in the client
    assert info.value.key == "model.bottleneck"
    with pytest.raises(ConfigError):
        ModelSpec(widths=(4, 8), cut=2, bottleneck=-1)


def test_split_training_through_a_bottleneck_sends_flat_noisy_features():
    spec = ModelSpec(widths=(4, 8), hidden=(8,), cut=2, bottleneck=3)
    job = synthetic_job((48, 32), batch=16, local_steps=2, epochs=1)
    job = SplitJob(spec, job.train, DefenceConfig(sigma=0.5), job.owner_sizes, job.load_owner)
    result = create_transport("inprocess").train(job, progress=False)
    assert result.bank["features"].shape == (80, 3)
    images = job.load_owner(1)[0][:8]
    with torch.no_grad():
        clean = result.model.eval().client(images)
    assert not torch.allclose(result.bank["features"][:8].float(), clean, atol=1e-2)  # what crossed carried the noise


# ----------------------------------------------------------------- the server's gate
@pytest.fixture
def server() -> SplitServer:
    return SplitServer(build_model(SMALL, seed=0).server, SMALL.cut_shape, TrainConfig(), total_steps=100)


def good_batch(b: int = 6) -> SmashedBatch:
    g = torch.Generator().manual_seed(3)
    return SmashedBatch(1, torch.rand(b, *SMALL.cut_shape, generator=g), torch.randint(0, 10, (b,), generator=g))


def with_nan(f: torch.Tensor) -> torch.Tensor:
    f = f.clone()
    f[0, 0, 0, 0] = float("nan")
    return f


BAD = {
    "raw image": lambda m: SmashedBatch(1, torch.rand(len(m.labels), 1, 28, 28), m.labels),
    "flat features": lambda m: SmashedBatch(1, m.features.reshape(len(m.labels), -1), m.labels),
    "float64": lambda m: SmashedBatch(1, m.features.double(), m.labels),
    "float16": lambda m: SmashedBatch(1, m.features.half(), m.labels),
    "int32 labels": lambda m: SmashedBatch(1, m.features, m.labels.int()),
    "float labels": lambda m: SmashedBatch(1, m.features, m.labels.float()),
    "short labels": lambda m: SmashedBatch(1, m.features, m.labels[:-1]),
    "label 10": lambda m: SmashedBatch(1, m.features, torch.full_like(m.labels, 10)),
    "label -1": lambda m: SmashedBatch(1, m.features, torch.full_like(m.labels, -1)),
    "NaN": lambda m: SmashedBatch(1, with_nan(m.features), m.labels),
    "Inf": lambda m: SmashedBatch(1, m.features / 0.0, m.labels),
    "empty": lambda m: SmashedBatch(1, m.features[:0], m.labels[:0]),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_server_rejects_malformed_messages_before_learning_from_them(server, kind):
    before = {k: v.clone() for k, v in server.server.state_dict().items()}
    with pytest.raises(MessageRejected):
        server.handle(BAD[kind](good_batch()))
    after = server.server.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no step was taken
    assert server.seen == 0


def test_server_accepts_smashed_features_and_returns_their_gradient(server):
    msg = good_batch()
    before = server.server.fc.weight.detach().clone()
    reply = server.handle(msg)
    assert reply.grad.shape == msg.features.shape and reply.grad.dtype == torch.float32
    assert torch.isfinite(reply.grad).all() and reply.grad.abs().sum() > 0
    assert math.isfinite(reply.loss) and reply.loss > 0
    assert not torch.equal(before, server.server.fc.weight)  # the vendor stepped
    assert server.seen == len(msg.labels)


# ----------------------------------------------------------------- schedule and replay
def synthetic_job(sizes: tuple[int, ...], batch: int, local_steps: int, epochs: int = 2, seed: int = 5) -> SplitJob:
    g = torch.Generator().manual_seed(seed)
    data = tuple((torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)) for n in sizes)
    return SplitJob(
        SMALL,
        TrainConfig(epochs=epochs, batch_size=batch, lr=1e-3, local_steps=local_steps, seed=seed),
        DefenceConfig(),
        sizes,
        InMemoryOwners(data),
    )


@pytest.mark.parametrize(
    "sizes, batch, local_steps",
    [((100, 100), 16, 2), ((100, 37, 250), 16, 3), ((64,), 64, 1), ((1, 1000), 7, 25), ((500, 499, 10), 128, 1)],
)
def test_schedule_sends_every_batch_once(sizes, batch, local_steps):
    job = SplitJob(SMALL, TrainConfig(batch_size=batch, local_steps=local_steps), DefenceConfig(), sizes, InMemoryOwners(()))
    schedule = job.schedule()
    for k, n in enumerate(sizes):
        assert sum(r[k] for r in schedule) == math.ceil(n / batch)
    assert all(0 <= c <= local_steps for r in schedule for c in r)
    assert all(any(c > 0 for c in r) for r in schedule)  # no empty rounds


def test_feature_bank_holds_every_owner_image_once_as_the_final_client_sees_it():
    job = synthetic_job((100, 60), batch=16, local_steps=2, epochs=2)
    result = create_transport("inprocess").train(job, progress=False)
    owners, positions = bank_positions(job)
    assert torch.equal(result.bank["owners"], owners)
    labels = torch.stack([job.load_owner(int(k))[1][int(i)] for k, i in zip(owners, positions)])
    assert torch.equal(result.bank["labels"], labels)
    for k, n in ((1, 100), (2, 60)):  # every image exactly once
        assert sorted(positions[owners == k].tolist()) == list(range(n))
    assert result.bank["features"].shape == (160, *SMALL.cut_shape)
    images = job.load_owner(1)[0][:5]
    with torch.no_grad():  # no noise here (no defence): the final client, in evaluation mode
        expected = result.model.eval().client(images)
    torch.testing.assert_close(result.bank["features"][:5].float(), expected, rtol=1e-2, atol=1e-3)  # stored as float16


def test_split_training_is_a_function_of_the_seed_dropout_included():
    spec = ModelSpec(widths=(4, 8), hidden=(8,), cut=1, dropout=0.5)
    job = synthetic_job((64, 64), batch=16, local_steps=2, epochs=1)
    job = SplitJob(spec, job.train, job.defence, job.owner_sizes, job.load_owner)
    state = torch.random.get_rng_state()
    a = create_transport("inprocess").train(job, progress=False).model
    torch.manual_seed(123)  # the global stream must not matter
    b = create_transport("inprocess").train(job, progress=False).model
    torch.random.set_rng_state(state)
    assert states_equal(a, b)


# ----------------------------------------------------------------- registry and init
def test_unknown_transport_lists_valid_names():
    with pytest.raises(UnknownName) as info:
        create_transport("nope")
    assert {"inprocess", "gloo"} <= set(transport_names())
    for name in transport_names():
        assert name in str(info.value)


def states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_model_init_is_a_function_of_the_seed():
    spec = ModelSpec()
    assert states_equal(build_model(spec, 11), build_model(spec, 11))
    assert not states_equal(build_model(spec, 11), build_model(spec, 12))


def test_model_init_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    build_model(ModelSpec(), 11)
    assert torch.equal(state, torch.random.get_rng_state())


# ----------------------------------------------------------------- attacker-aware training
def test_the_simulated_attacker_changes_what_the_owner_learns():
    def trained(defence: DefenceConfig):
        job = synthetic_job((64, 64), batch=16, local_steps=2, epochs=1)
        return create_transport("inprocess").train(SplitJob(job.spec, job.train, defence, job.owner_sizes, job.load_owner), progress=False).model

    plain, aware = trained(DefenceConfig()), trained(DefenceConfig(adversary=1.0, tau=0.0, simulator_width=4))
    again = trained(DefenceConfig(adversary=1.0, tau=0.0, simulator_width=4))
    w = "client.block1.conv.weight"
    assert not torch.equal(plain.state_dict()[w], aware.state_dict()[w])  # the penalty reached the client
    assert torch.equal(aware.state_dict()[w], again.state_dict()[w])  # and is a function of the seed


@pytest.mark.parametrize("options, key", [({"adversary": -1.0}, "adversary"), ({"tau": 1.0}, "tau"), ({"simulator_width": 2}, "simulator_width")])
def test_defence_config_rejects_bad_attacker_aware_settings(options, key):
    with pytest.raises(ConfigError, match=f"defence.{key}"):
        DefenceConfig(**options)
