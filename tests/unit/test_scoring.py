"""Scorers, vectorised scoring and the distribution-free false-accusation bound."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from securemark.codes import available_codes, create_code
from securemark.scoring import (
    available_scorers,
    create_scorer,
    log_tail_bound,
    p_values,
    score_all,
    score_dense,
    threshold,
)

SCORERS = available_scorers()


@pytest.fixture(scope="module")
def book():
    """A synthetic Tardos code book: 20,000 customers x 512 bits."""
    return create_code("tardos", code_length=512).generate(20_000, seed=0)


@pytest.fixture(scope="module")
def long_book():
    """Longer words, enough to catch a coalition of 4."""
    return create_code("tardos", code_length=2048).generate(5_000, seed=1)


def test_unknown_scorer_lists_valid_names():
    with pytest.raises(ValueError) as info:
        create_scorer("nope")
    for name in ("correlation", "tardos"):
        assert name in str(info.value)


@pytest.mark.parametrize("name", SCORERS)
def test_weights_are_unit_and_reject_bad_input(name):
    scorer = create_scorer(name)
    w = scorer.weights(np.array([0.3, -2.0, 0.1, 5.0]))
    assert w.dtype == np.float64 and math.isclose(np.linalg.norm(w), 1.0)
    assert np.all(np.sign(w) == [1, -1, 1, 1])
    for bad in (np.zeros(4), np.array([1.0, np.nan]), np.ones((2, 2))):
        with pytest.raises(ValueError, match="y"):
            scorer.weights(bad)


def test_tardos_scorer_is_the_symmetric_tardos_score(book):
    rng = np.random.default_rng(3)
    y = rng.standard_normal(book.length)
    p = book.biases
    bits = book.words(np.arange(50)).astype(float)
    hard = (y > 0).astype(float)
    # Skoric et al.: +sqrt((1-p)/p) when bit and decision agree on 1, +sqrt(p/(1-p)) on 0, negatives otherwise
    agree1 = bits * hard * np.sqrt((1 - p) / p)
    agree0 = (1 - bits) * (1 - hard) * np.sqrt(p / (1 - p))
    disagree_b1 = -bits * (1 - hard) * np.sqrt((1 - p) / p)
    disagree_b0 = -(1 - bits) * hard * np.sqrt(p / (1 - p))
    tardos = (agree1 + agree0 + disagree_b1 + disagree_b0).sum(axis=1)
    scores = score_all(book, create_scorer("tardos").weights(y))[:50]
    assert np.allclose(scores, tardos / math.sqrt(book.length))


@pytest.mark.parametrize("family", available_codes())
@pytest.mark.parametrize("name", SCORERS)
def test_score_all_matches_dense_computation(family, name):
    cfg = {"order": 7} if family == "bibd" else {"code_length": 301}  # 301: not a multiple of 8
    small = create_code(family, **cfg).generate(40, seed=2)
    y = np.random.default_rng(4).standard_normal(small.length)
    w = create_scorer(name).weights(y)
    dense = score_dense(small.words(slice(None)), w, small.biases)
    assert np.allclose(score_all(small, w), dense, atol=1e-10)
    rows = np.array([31, 2, 17, 2])  # some customers (a trace scores the issued ones), any order, repeats
    assert np.array_equal(score_all(small, w, rows), score_all(small, w)[rows])


@pytest.mark.parametrize("name", SCORERS)
def test_innocent_scores_are_standardised(book, name):
    rng = np.random.default_rng(5)
    for y in (rng.standard_normal(book.length), 2.0 * book.word(0) - 1.0):  # independent y, and one colluder's word
        scores = score_all(book, create_scorer(name).weights(y))[1:]
        assert abs(scores.mean()) < 0.04
        assert abs(scores.var() - 1.0) < 0.06


@pytest.mark.parametrize("name", SCORERS)
def test_single_leaker_is_accused_alone(book, name):
    rng = np.random.default_rng(6)
    leaker = 1234
    y = 2.0 * book.word(leaker) - 1.0 + 0.8 * rng.standard_normal(book.length)
    w = create_scorer(name).weights(y)
    scores = score_all(book, w)
    z = threshold(w, book.biases, 1e-6, len(book))
    assert np.flatnonzero(scores >= z).tolist() == [leaker]
    assert scores[leaker] > z + 3
    per_customer, family_wise = p_values(scores, w, book.biases, len(book))
    assert family_wise[leaker] < 1e-6
    assert np.all(family_wise[np.arange(len(book)) != leaker] > 1e-6)


@pytest.mark.parametrize("name", SCORERS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_averaging_coalition_of_four_is_caught(long_book, name, seed):
    rng = np.random.default_rng(seed)
    colluders = rng.choice(len(long_book), size=4, replace=False)
    y = (2.0 * long_book.words(colluders) - 1.0).mean(axis=0) + 0.1 * rng.standard_normal(long_book.length)
    w = create_scorer(name).weights(y)
    scores = score_all(long_book, w)
    accused = set(np.flatnonzero(scores >= threshold(w, long_book.biases, 1e-3, len(long_book))).tolist())
    assert accused & set(colluders.tolist())
    assert accused <= set(colluders.tolist())


def test_threshold_is_monotone(book):
    w = create_scorer("correlation").weights(np.random.default_rng(7).standard_normal(book.length))
    p = book.biases
    by_epsilon = [threshold(w, p, eps, 1000) for eps in (1e-1, 1e-2, 1e-4, 1e-8, 1e-12)]
    by_customers = [threshold(w, p, 1e-3, n) for n in (1, 10, 1000, 1_000_000)]
    assert all(a < b for a, b in itertools.pairwise(by_epsilon))
    assert all(a < b for a, b in itertools.pairwise(by_customers))
    # roughly Gaussian for spread weights: between the Gaussian quantile and a few units above
    assert 3.0 < threshold(w, p, 1e-3, 1) < 5.0


@pytest.mark.parametrize("spread", [1.0, 3.0])
def test_threshold_is_the_smallest_score_whose_bound_meets_epsilon(spread):
    rng = np.random.default_rng(int(spread))
    for m in (16, 301, 2048):
        w = rng.standard_normal(m) * rng.random(m) ** spread  # spread 3: a few heavy positions
        w /= np.linalg.norm(w)
        p = rng.uniform(0.1, 0.9, m)
        for epsilon, n in ((1e-6, 10_000), (1e-2, 1)):
            z = threshold(w, p, epsilon, n)
            if not math.isfinite(z):
                continue
            target = math.log(epsilon) - math.log(n)
            assert log_tail_bound(w, p, z) <= target + 1e-9  # valid: the union bound holds at z
            assert log_tail_bound(w, p, z * (1 - 1e-6)) > target  # tight: a little lower does not


def test_bound_is_exact_for_one_position_and_valid_on_every_tiny_code():
    # one position: S = u+ with probability p, so P(S >= u+) = p exactly
    p = np.array([0.1])
    assert math.isclose(log_tail_bound(np.array([1.0]), p, 3.0 * (1 - 1e-13)), math.log(0.1), rel_tol=1e-6)
    assert log_tail_bound(np.array([1.0]), p, 3.1) == -math.inf
    assert log_tail_bound(np.array([1.0]), p, -1.0) == 0.0
    # enumerate all words of a 6-bit code: the true tail never exceeds the bound
    rng = np.random.default_rng(8)
    for _ in range(20):
        p = rng.uniform(0.02, 0.98, 6)
        w = rng.standard_normal(6)
        w /= np.linalg.norm(w)
        words = np.array(list(itertools.product([0, 1], repeat=6)), dtype=float)
        prob = np.prod(np.where(words == 1, p, 1 - p), axis=1)
        s = score_dense(words, w, p)
        for z in np.linspace(0.05, s.max(), 25):
            assert prob[s >= z - 1e-12].sum() <= math.exp(log_tail_bound(w, p, z)) * (1 + 1e-9)


@pytest.mark.parametrize("kind", ["fixed", "lowest_bias_1", "skewed_mix"])
def test_bound_is_the_minimum_over_lambda(book, kind):
    # the bound is min over lam >= 0 of K(lam) - lam z: the root finder must reach scipy's root
    # and no lam on a fine grid may give a tighter bound
    from scipy.optimize import brentq

    from securemark.scoring import _Cumulant

    k = _Cumulant(_adversarial_weights(book.biases, kind), book.biases)
    for z in np.linspace(0.02, 0.98, 9) * k.s_max:
        lam = k.best_lambda(z)
        hi = 1.0
        while k.slope(hi) < z:
            hi *= 2.0
        assert math.isclose(lam, brentq(lambda x: k.slope(x) - z, 0.0, hi, xtol=1e-12, rtol=1e-12), rel_tol=1e-9, abs_tol=1e-9)
        grid = np.linspace(0.0, 2.0 * lam + 1.0, 2001)
        assert k.log_bound(z) <= min(0.0, float((k.value(grid) - grid * z).min())) + 1e-9


def _adversarial_weights(p: np.ndarray, kind: str) -> np.ndarray:
    m = p.size
    rng = np.random.default_rng(9)
    lowest = np.argsort(p)
    w = np.zeros(m)
    if kind == "fixed":
        w = rng.standard_normal(m)
    elif kind == "lowest_bias_1":
        w[lowest[0]] = 1.0
    elif kind == "lowest_bias_8":
        w[lowest[:8]] = 1.0
    elif kind == "highest_bias_negative_8":
        w[lowest[-8:]] = -1.0  # large when the rarely-zero bits are zero
    elif kind == "skewed_mix":
        w[lowest[:32]] = np.linspace(1.0, 0.2, 32)
    return w / np.linalg.norm(w)


@pytest.mark.parametrize("kind", ["fixed", "lowest_bias_1", "lowest_bias_8", "highest_bias_negative_8", "skewed_mix"])
def test_bound_holds_against_adversarial_weights(book, kind):
    epsilon = 1e-2
    w = _adversarial_weights(book.biases, kind)
    z = threshold(w, book.biases, epsilon, 1)
    scores = score_all(book, w)  # 20,000 innocent words, independent of w
    assert np.mean(scores >= z) <= epsilon
    # and the bound itself is at least the empirical tail at several levels
    for level in np.quantile(scores, [0.9, 0.99, 0.999]):
        if level > 0:
            assert np.mean(scores >= level) <= math.exp(log_tail_bound(w, book.biases, level)) + 3e-3


def test_p_values_are_valid_upper_bounds(book):
    w = create_scorer("correlation").weights(np.random.default_rng(10).standard_normal(book.length))
    p = book.biases
    scores = np.array([-1.0, 0.0, 0.5, 2.0, 4.0, 6.0, 9.0])
    per_customer, family_wise = p_values(scores, w, p, 1000)
    assert per_customer[0] == per_customer[1] == 1.0
    exact = np.array([math.exp(log_tail_bound(w, p, s)) if s > 0 else 1.0 for s in scores])
    assert np.all(per_customer >= exact * (1 - 1e-9))  # conservative everywhere
    candidates = family_wise < 1
    assert candidates.any()
    assert np.allclose(per_customer[candidates], exact[candidates], rtol=1e-6)  # exact where it matters
    assert np.all(np.diff(per_customer) <= 0)
    assert np.allclose(family_wise, np.minimum(1.0, 1000 * per_customer))
