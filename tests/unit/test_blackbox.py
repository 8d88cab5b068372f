"""The black-box fingerprint: keys from the vendor's own images, targets from a code
word, answers to soft values, and a bound that holds whatever an API answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from securemark.blackbox import agreement, select_keys, soft_values, targets
from securemark.codes import create_code
from securemark.errors import InvalidInput
from securemark.model import ModelSpec, build_model
from securemark.tracing import decide, decide_peeling


@pytest.fixture(scope="module")
def base():
    return build_model(ModelSpec(widths=(4, 8), hidden=(8,), cut=1), 0).eval()


@pytest.fixture(scope="module")
def aux():
    return torch.rand(300, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def test_keys_are_hesitant_aux_images_chosen_by_the_secret(base, aux):
    keys = select_keys(base, aux, 40, seed=5, pool_factor=2)
    assert len(keys) == 40 and keys.images.shape == (40, 1, 28, 28)
    assert torch.equal(keys.images, aux[keys.rows])
    with torch.no_grad():
        top2 = base(aux).softmax(1).topk(2, dim=1)
    gap = top2.values[:, 0] - top2.values[:, 1]
    pool = set(torch.argsort(gap)[:80].tolist())
    assert set(keys.rows.tolist()) <= pool  # drawn from the most hesitant
    for row, pair in zip(keys.rows.tolist(), keys.pairs.tolist()):
        assert set(pair) == set(top2.indices[row].tolist())  # the base's two most likely classes
    other = select_keys(base, aux, 40, seed=6, pool_factor=2)
    assert not torch.equal(other.rows, keys.rows)  # another secret, other keys
    assert torch.equal(select_keys(base, aux, 40, seed=5, pool_factor=2).rows, keys.rows)


def test_targets_and_soft_values(base, aux):
    keys = select_keys(base, aux, 30, seed=1)
    bits = np.random.default_rng(0).integers(0, 2, 30).astype(np.uint8)
    t = targets(keys, bits)
    assert torch.equal(t, keys.pairs[torch.arange(30), torch.as_tensor(bits, dtype=torch.long)])
    y = soft_values(keys, t)  # a copy answering every target: +1 where the bit is 1
    assert np.array_equal(y, np.where(bits == 1, 1.0, -1.0))
    assert agreement(keys, bits, t) == 1.0
    other = (keys.pairs.sum(1) * 0 + 10 - 1) % 10  # label 9 everywhere: mostly neither candidate
    y_other = soft_values(keys, other)
    assert set(np.unique(y_other)) <= {-1.0, 0.0, 1.0}
    repeated = torch.stack([t, t, keys.pairs[:, 0], torch.full_like(t, -1)], 1)  # two right, one A, one not asked
    y_rep = soft_values(keys, repeated)
    assert np.allclose(y_rep, np.where(bits == 1, 1.0 / 3, -1.0))
    scores = torch.full((30, 10), 0.01)
    scores[torch.arange(30), keys.pairs[:, 0]] = 0.7
    assert np.allclose(soft_values(keys, scores), -0.69)
    with pytest.raises(InvalidInput):
        soft_values(keys, t[:5])


def test_an_unmodified_copy_is_accused_and_random_apis_never_are():
    n, customers = 256, 1000
    book = create_code("random", code_length=n).generate(customers, seed=3)
    rng = np.random.default_rng(9)
    copy_y = np.where(book.word(17) == 1, 1.0, -1.0)
    verdict = decide(copy_y, book, np.arange(customers), epsilon=1e-6)
    assert [c.codeword_index for c in verdict.accused] == [17]
    trials, epsilon, accusations = 300, 1e-2, 0
    for trial in range(trials):  # null APIs: answers independent of every customer's word
        kind = trial % 3
        if kind == 0:
            y = rng.choice([-1.0, 0.0, 1.0], size=n)  # label-only answers
        elif kind == 1:
            y = rng.uniform(-1, 1, n)  # scores
        else:
            y = np.sign(rng.normal(size=n)) * (rng.random(n) < 0.2)  # mostly other labels
        if not np.any(y):
            continue
        v = decide_peeling(y, book, np.arange(customers), epsilon=epsilon)  # a generous epsilon, so the bound is exercised
        accusations += bool(v.accused)
    # each trace accuses someone with probability <= epsilon: over 300 traces, 3 expected at most
    assert accusations <= 2 * epsilon * trials + 3
