"""Embedding a code word into server weights, reading it back, and deciding whom to
accuse, on a tiny model and a synthetic feature bank."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from securemark.codes import create_code
from securemark.errors import ConfigError
from securemark.errors import InvalidInput
from securemark.fingerprint import EmbedConfig, EmbeddingFailed, Readout, bit_error_rate, carrier_inputs, embed, extract, margin_scale
from securemark.key import projection
from securemark.model import ModelSpec, SplitNet, build_model, fold_batchnorm
from securemark.tracing import decide

SPEC = ModelSpec(widths=(4, 8, 32), hidden=(32,), cut=2)
LAYER = "server.block3.conv.weight"
CODE_LENGTH = 64
SECRET = bytes(range(32))
FAST = dict(lr=3e-3, batch_size=64, check_every=10, accuracy_tolerance=0.05, eval_rows=1000)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py


def smooth_images(n: int, seed: int) -> torch.Tensor:
    """Random images with some spatial structure (like real ones: neighbouring pixels agree)."""
    coarse = torch.rand(n, 1, 7, 7, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=28, mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def bank() -> tuple[torch.Tensor, torch.Tensor]:
    """The smashed features [2000, 8, 7, 7] of synthetic images through the base model's
    client, labelled by a fixed random "teacher" server (logits centred per class so
    every class occurs)."""
    with torch.no_grad():
        features = build_model(SPEC, 2).eval().client(smooth_images(2000, 0))
    teacher = build_model(SPEC, 1).eval()
    with torch.no_grad():
        logits = teacher.server(features)
        labels = (logits - logits.mean(0)).argmax(1)
    assert len(labels.unique()) >= 5  # there is something to learn
    return features, labels


@pytest.fixture(scope="module")
def base(bank) -> SplitNet:
    """A base model whose server learnt the teacher a little (so accuracy is meaningful)."""
    features, labels = bank
    model = build_model(SPEC, 2)
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)  # dropout draws from the global generator: the base must not depend on earlier tests
    optimizer = torch.optim.Adam(model.server.parameters(), lr=1e-2)
    for _ in range(400):
        idx = torch.randint(len(labels), (128,), generator=g)
        loss = F.cross_entropy(model.server(features[idx]), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return model


@pytest.fixture(scope="module", params=["response", "weights"])
def readout(request, base) -> Readout:
    """Both readouts: the layer's responses on probe images, and its raw weights."""
    return Readout.build(request.param, base, LAYER, smooth_images(256, 9), rank=32)


@pytest.fixture(scope="module")
def key_matrix(base, readout) -> torch.Tensor:
    return projection(SECRET, LAYER, CODE_LENGTH, readout.features(base).numel())


@pytest.fixture(scope="module")
def bits() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 2, CODE_LENGTH).astype(np.uint8)


def _clone_state(model: SplitNet) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def embedded(base, bank, key_matrix, bits, readout):
    cfg = EmbedConfig(layer=LAYER, margin=0.5, max_steps=2000, **FAST)
    before = _clone_state(base)
    features, labels = bank
    result = embed(base, bits, key_matrix, readout, carrier_inputs(base, LAYER, features), labels, cfg, torch.Generator().manual_seed(3))
    return cfg, before, result


def test_embedding_reaches_zero_ber_with_the_margin(embedded, base, key_matrix, bits, readout):
    cfg, _, result = embedded
    assert result.ber == 0.0
    assert result.min_margin >= cfg.margin  # in units of the base's RMS of y
    assert result.steps > 0  # the base model did not carry the word by chance
    assert bit_error_rate(extract(base, readout, key_matrix), bits) > 0.2
    assert result.bank_accuracy >= result.base_bank_accuracy - cfg.accuracy_tolerance


def test_embedding_leaves_the_base_model_unchanged(embedded, base):
    _, before, result = embedded
    after = base.state_dict()
    assert after.keys() == before.keys()
    for name in before:
        assert torch.equal(after[name], before[name]), name
    assert result.model is not base
    assert not torch.equal(result.model.state_dict()[LAYER], before[LAYER])


def test_embedding_changes_no_client_parameter(embedded):
    _, before, result = embedded
    state = result.model.state_dict()
    client = [k for k in state if k.startswith("client.")]
    assert client
    for name in client:
        assert torch.equal(state[name], before[name]), name
    assert any(not torch.equal(state[k], before[k]) for k in state if k.startswith("server."))


def test_extract_agrees_in_sign_with_the_code_word(embedded, base, key_matrix, bits, readout):
    cfg, _, result = embedded
    s = 2.0 * bits.astype(np.float64) - 1.0
    unit = margin_scale(base, readout, key_matrix)
    for source in (result.model, fold_batchnorm(result.model)):  # the effective weight: the same once the norm is folded
        y = extract(source, readout, key_matrix).numpy()
        assert y.dtype == np.float64 and y.shape == (CODE_LENGTH,)
        assert np.array_equal(y > 0, bits.astype(bool))
        assert (s * y).min() >= cfg.margin * unit * (1 - 1e-4)


def test_extract_under_another_key_does_not_read_the_word(embedded, bits, readout):
    _, _, result = embedded
    other = projection(bytes(32 * [7]), LAYER, CODE_LENGTH, readout.features(result.model).numel())
    assert bit_error_rate(extract(result.model, readout, other), bits) > 0.2


def test_response_readout_ignores_weight_changes_the_data_does_not_excite(base):
    """Noise added in the weakest directions of the layer's inputs moves the raw weights
    a lot and the responses (hence y) hardly at all."""
    probe = smooth_images(256, 9)
    response, weights = Readout.build("response", base, LAYER, probe, rank=32), Readout.build("weights", base, LAYER, probe)
    from securemark.model import input_covariance, units

    index = [p for p, _ in units(base)].index("server.block3")
    eigenvalues, vectors = torch.linalg.eigh(input_covariance(fold_batchnorm(base), index, probe))
    weak = vectors[:, :5].to(torch.float32)  # the 5 least excited directions
    noisy = fold_batchnorm(base)
    w = noisy.server.block3.conv.weight
    with torch.no_grad():
        noise = torch.randn(w.shape[0], 5, generator=torch.Generator().manual_seed(1)) @ weak.T
        w.add_((10 * w.norm() / noise.norm()) * noise.view_as(w))
    def change(readout):  # how far the noisy model reads from the base, relative to the base's own readout
        assert float(readout.features(fold_batchnorm(base)).abs().max()) < 1e-4  # the base reads as 0
        return float(readout.features(noisy).norm() / readout.origin.norm())
    assert change(weights) > 5.0 and change(response) < 0.05 * change(weights)


def test_unreachable_margin_raises_embedding_failed(base, bank, key_matrix, bits, readout):
    cfg = EmbedConfig(layer=LAYER, margin=100.0, max_steps=1, **{**FAST, "lr": 1e-4})
    before = _clone_state(base)
    with pytest.raises(EmbeddingFailed, match="not embedded after"):
        embed(base, bits, key_matrix, readout, carrier_inputs(base, LAYER, bank[0]), bank[1], cfg, torch.Generator().manual_seed(0))
    assert all(torch.equal(base.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("layer", ["client.block1.conv.weight", "block3.conv.weight", "fc.weight"])
def test_embed_config_rejects_a_non_server_layer(layer):
    with pytest.raises(ConfigError, match="fingerprint.layer"):
        EmbedConfig(layer=layer)


@pytest.mark.parametrize("key", ["lam", "margin", "lr"])
def test_embed_config_rejects_non_positive_values(key):
    with pytest.raises(ConfigError, match=f"fingerprint.{key}"):
        EmbedConfig(**{key: 0.0})


def test_extract_rejects_a_key_of_the_wrong_width(base, readout):
    with pytest.raises(InvalidInput, match="key expects"):
        extract(base, readout, torch.zeros(CODE_LENGTH, 7))


# --------------------------------------------------------------------------- decide


@pytest.fixture(scope="module")
def codebook():
    return create_code("random", code_length=256).generate(200, seed=5)


def test_decide_accuses_exactly_the_customer_whose_word_is_in_y(codebook):
    rng = np.random.default_rng(1)
    guilty = 37
    b = codebook.word(guilty).astype(np.float64)
    y = 0.2 * (2 * b - 1) + rng.normal(0, 0.1, b.size)
    verdict = decide(y, codebook, np.arange(len(codebook)), epsilon=1e-6)
    assert [c.codeword_index for c in verdict.accused] == [guilty]
    accused = verdict.accused[0]
    assert accused.score >= verdict.threshold and accused.family_p <= 1e-6
    assert all(c.score < verdict.threshold for c in verdict.top_others)
    assert verdict.n_customers == len(codebook) and verdict.scores.shape == (len(codebook),)


def test_decide_scores_only_the_given_indices(codebook):
    b = codebook.word(37).astype(np.float64)
    y = 0.2 * (2 * b - 1)
    verdict = decide(y, codebook, np.arange(0, 30), epsilon=1e-6)  # 37 is not in the ledger
    assert verdict.accused == [] and verdict.n_customers == 30


def test_a_model_that_reads_exactly_like_the_base_is_a_verdict_not_a_crash(codebook):
    from securemark.tracing import decide_peeling

    for decoder in (decide, decide_peeling):
        verdict = decoder(np.zeros(codebook.length), codebook, np.arange(len(codebook)), epsilon=1e-6)
        assert verdict.accused == [] and verdict.threshold == float("inf") and "base model" in verdict.note


def test_decide_accuses_no_one_for_an_unrelated_vector(codebook):
    for seed in range(5):
        y = np.random.default_rng(100 + seed).normal(0, 0.2, codebook.length)
        verdict = decide(y, codebook, np.arange(len(codebook)), epsilon=1e-6)
        assert verdict.accused == [], seed
        assert np.isfinite(verdict.threshold) and verdict.scores.max() < verdict.threshold


def test_verdict_to_dict_is_json_serialisable(codebook):
    b = codebook.word(3).astype(np.float64)
    verdict = decide(0.2 * (2 * b - 1), codebook, np.arange(len(codebook)), epsilon=1e-6)
    d = json.loads(json.dumps(verdict.to_dict()))
    assert "scores" not in d
    assert d["accused"][0]["codeword_index"] == 3
    assert {"scorer", "epsilon", "threshold", "n_customers", "top_others"} <= set(d)
