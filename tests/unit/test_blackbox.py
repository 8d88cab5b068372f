"""The black-box fingerprint: keys from the vendor's own images and secret patterns,
targets from a q-ary word, answers to a profile, and a bound that holds whatever an
API answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from securemark.tracing.blackbox import (SymbolBook, agreement, decide, make_keys, natural_keys, profile, query_order, score_all, secret_patterns, shed,
                                         sequential_trace, symbol_profile, targets, threshold)
from securemark.errors import InvalidInput


@pytest.fixture(scope="module")
def aux():
    return torch.rand(300, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def test_keys_are_aux_images_blended_with_secret_patterns(aux):
    keys = make_keys(aux, 10, 3, seed=5, blend=0.4, cells=7)
    assert len(keys) == 30 and keys.images.shape == (30, 1, 28, 28) and keys.patterns == 10
    assert torch.equal(keys.pattern, torch.arange(30) % 10)  # round by round: the first 10 keys ask every pattern once
    assert len(set(keys.rows.tolist())) == 30  # distinct aux images
    pats = secret_patterns(6, 10, 7)
    assert set(pats.unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(keys.images, (0.6 * aux[keys.rows] + 0.4 * pats[keys.pattern]).clamp(0, 1))
    assert torch.equal(make_keys(aux, 10, 3, seed=5).images, keys.images)  # the secret rebuilds them
    assert not torch.equal(make_keys(aux, 10, 3, seed=6).rows, keys.rows)  # another secret, other keys
    with pytest.raises(InvalidInput):
        make_keys(aux, 100, 4, seed=5)  # more keys than aux images


def test_targets_profile_and_agreement(aux):
    keys = make_keys(aux, 8, 4, seed=1)
    word = np.random.default_rng(0).integers(0, 10, 8)
    t = targets(keys, word)
    assert torch.equal(t, torch.as_tensor(word)[keys.pattern])
    P = profile(keys, t)  # a copy answering every target: all its mass on the word's symbol
    assert np.allclose(P[np.arange(8), word], 1.0) and np.isclose(P.sum(), 8)
    assert agreement(keys, word, t) == 1.0
    repeated = torch.stack([t, (t + 1) % 10, torch.full_like(t, -1)], 1)  # one right, one wrong, one not asked
    assert np.allclose(profile(keys, repeated)[np.arange(8), word], 0.5)
    assert np.allclose(profile(keys, torch.full_like(t, 12)), 0.0)  # labels that are no class count for nothing
    scores = torch.full((32, 10), 0.02)
    scores[torch.arange(32), t] = 0.82
    assert np.allclose(profile(keys, scores)[np.arange(8), word], 0.82)
    half = t.clone()
    half[16:] = -1  # the first round asked, the second not
    assert np.allclose(profile(keys, half)[np.arange(8), word], 1.0)
    with pytest.raises(InvalidInput):
        targets(keys, word[:5])
    with pytest.raises(InvalidInput):
        profile(keys, t[:5])


def test_query_order_spreads_every_prefix_over_the_patterns(aux):
    keys = make_keys(aux, 16, 4, seed=2)
    order = query_order(keys, seed=3)
    assert sorted(order.tolist()) == list(range(64))
    assert sorted(keys.pattern[order[:16]].tolist()) == list(range(16))  # the first round asks every pattern once
    assert not torch.equal(order, query_order(keys, seed=4))


def test_threshold_is_a_valid_chernoff_bound():
    rng = np.random.default_rng(0)
    P = np.eye(10)[rng.integers(0, 10, 64)]  # hard answers: an innocent scores Binomial(64, 1/10)
    thr = threshold(P, 1e-6)
    from scipy.stats import binom
    assert binom.sf(np.ceil(thr) - 1, 64, 0.1) <= 1e-6  # exact tail at the threshold is below delta
    assert 6.4 < thr < 64


def test_an_unmodified_copy_is_accused_and_random_apis_never_are(aux):
    keys = make_keys(aux, 32, 4, seed=3)
    customers = 1000
    book = SymbolBook.generate(customers, 32, seed=4)
    copy = targets(keys, book.word(17))
    result = sequential_trace(lambda x, k=keys, c=copy: c[_rows(k, x)], keys, book, np.arange(customers), 1e-6, (32, 64, 128))
    assert [c.codeword_index for c in result.verdict.accused] == [17] and result.queries == 32  # stops at the first checkpoint
    rng = np.random.default_rng(9)
    trials, epsilon, accusations = 300, 1e-2, 0
    for trial in range(trials):  # null APIs: answers independent of every customer's word
        kind = trial % 3
        if kind == 0:
            answers = torch.as_tensor(rng.integers(0, 10, len(keys)))  # label-only, uniform
        elif kind == 1:
            answers = torch.as_tensor(rng.dirichlet(np.ones(10) * 0.3, len(keys)))  # scores
        else:
            answers = torch.as_tensor(np.where(rng.random(len(keys)) < 0.8, 3, rng.integers(0, 10, len(keys))))  # mostly one class
        v = decide(profile(keys, answers), book, np.arange(customers), epsilon)  # a generous epsilon, so the bound is exercised
        accusations += bool(v.accused)
    # each trace accuses someone with probability <= epsilon: over 300 traces, 3 expected at most
    assert accusations <= 2 * epsilon * trials + 3


def test_a_coalition_answering_from_random_members_is_caught():
    aux = torch.rand(512, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    keys = make_keys(aux, 64, 8, seed=3)
    customers = 10_000
    book = SymbolBook.generate(customers, 64, seed=5)
    members = [11, 222, 3333, 4444]
    answers = torch.stack([targets(keys, book.word(i)) for i in members])
    pick = torch.as_tensor(np.random.default_rng(1).integers(0, 4, (1, len(keys))))
    calls = iter(range(1))

    def ask(x):  # every query answered by a random member (one pass over the keys)
        rows = _rows(keys, x)
        return answers[pick[next(calls), rows], rows]

    result = sequential_trace(ask, keys, book, np.arange(customers), 1e-6, (512,))
    accused = {c.codeword_index for c in result.verdict.accused}
    assert accused and accused <= set(members)


def _rows(keys, images):
    """Which keys ``images`` are (the tests' in-process APIs answer by key)."""
    flat = keys.images.flatten(1)
    return torch.cdist(images.flatten(1), flat).argmin(1)


def test_other_images_under_the_same_patterns(aux):
    keys = make_keys(aux, 10, 3, seed=5)
    fresh = make_keys(aux, 10, 3, seed=5, image_seed=8)
    assert not torch.equal(fresh.rows, keys.rows)
    pats = secret_patterns(6, 10, 7)
    assert torch.allclose(fresh.images, (0.6 * aux[fresh.rows] + 0.4 * pats[fresh.pattern]).clamp(0, 1))


def test_reading_on_until_the_accused_explain_the_answers_finds_both_colluders():
    aux = torch.rand(512, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    keys = make_keys(aux, 64, 8, seed=3)
    book = SymbolBook.generate(10_000, 64, seed=6)
    members = [21, 4321]
    answers = torch.stack([targets(keys, book.word(i)) for i in members])
    pick = torch.as_tensor(np.random.default_rng(2).integers(0, 2, len(keys)))
    copy = answers[pick, torch.arange(len(keys))]  # every key answered by one of the two members

    def ask(x):
        return copy[_rows(keys, x)]

    first = sequential_trace(ask, keys, book, np.arange(10_000), 1e-6, (64, 128, 256, 512))
    both = sequential_trace(ask, keys, book, np.arange(10_000), 1e-6, (64, 128, 256, 512), explain=0.8)
    assert {c.codeword_index for c in first.verdict.accused} <= set(members)
    assert {c.codeword_index for c in both.verdict.accused} == set(members)
    assert both.queries >= first.queries
    single = sequential_trace(lambda x: answers[0][_rows(keys, x)], keys, book, np.arange(10_000), 1e-6, (64, 128, 256, 512), explain=0.8)
    assert single.queries == 64 and [c.codeword_index for c in single.verdict.accused] == [21]  # one copy explains all: stop early


def test_a_read_too_short_to_accuse_an_unmodified_copy_is_inconclusive(aux):
    """A budget below what the bound needs cannot accuse anyone, whatever the API is: its
    'no one accused' is inconclusive, never clean; from the needed patterns on, a clean
    read of a null API is conclusive and an unmodified copy is accused."""
    from securemark.tracing.blackbox import patterns_needed

    keys = make_keys(aux, 32, 4, seed=3)
    customers, epsilon = 1000, 1e-6
    book = SymbolBook.generate(customers, 32, seed=4)
    needed = patterns_needed(10, customers, epsilon, 32)
    assert needed is not None and 0.1 ** needed * customers <= epsilon * (1 + 1e-9)  # an innocent matching all is that rare
    assert 0.1 ** (needed - 1) * customers > epsilon  # ... and one pattern fewer is not (the Chernoff bound is tight here)
    assert patterns_needed(10, customers, 1e-300, 32) is None  # no read of 32 patterns meets this bound
    copy = targets(keys, book.word(17))
    ask = lambda x, k=keys, c=copy: c[_rows(k, x)]  # noqa: E731
    short = sequential_trace(ask, keys, book, np.arange(customers), epsilon, (needed - 1,))
    assert short.verdict.accused == [] and short.inconclusive and short.answered == needed - 1
    assert "inconclusive" in short.verdict.note
    enough = sequential_trace(ask, keys, book, np.arange(customers), epsilon, (needed,))
    assert [c.codeword_index for c in enough.verdict.accused] == [17] and not enough.inconclusive
    other = targets(keys, book.word(5))
    book_without = np.setdiff1d(np.arange(customers), [5])  # an API whose word no scored customer holds: clean, conclusive
    clean = sequential_trace(lambda x, k=keys, c=other: c[_rows(k, x)], keys, book, book_without, epsilon, (32,))
    assert clean.verdict.accused == [] and not clean.inconclusive
    refusing = sequential_trace(lambda x: torch.full((len(x),), 99), keys, book, np.arange(customers), epsilon, (32,))
    assert refusing.answered == 0 and refusing.inconclusive  # no key answered with a class: nothing was read


def _unsure_probs(n: int, seed: int) -> torch.Tensor:
    """Class probabilities of ``n`` images, some nearly tied between two classes."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(n, 10, generator=g), 1)


def test_natural_keys_are_unmodified_aux_images_the_base_is_least_sure_of(aux):
    probs = _unsure_probs(len(aux), 0)
    keys = natural_keys(aux, probs, 40, seed=1, pool=2.0)
    assert len(keys) == keys.patterns == 40 and keys.q == 2 and torch.equal(keys.pattern, torch.arange(40))
    assert torch.equal(keys.images, aux[keys.rows])  # the images themselves: nothing added
    top = probs.topk(2, 1)
    ratio = top.values[:, 1] / top.values[:, 0]
    assert set(keys.rows.tolist()) <= set(ratio.argsort(descending=True)[:80].tolist())  # from the 80 least sure
    assert torch.equal(keys.candidates, top.indices[keys.rows])  # the base's top class and runner-up
    assert torch.equal(natural_keys(aux, probs, 40, seed=1).rows, keys.rows)  # the secret rebuilds them
    assert not torch.equal(natural_keys(aux, probs, 40, seed=2).rows, keys.rows)  # another secret, another draw
    with pytest.raises(InvalidInput):
        natural_keys(aux, probs[:10], 5, seed=1)  # probabilities for other images
    with pytest.raises(InvalidInput):
        natural_keys(aux, probs, len(aux) + 1, seed=1)


def test_natural_targets_are_the_candidate_a_binary_symbol_picks(aux):
    keys = natural_keys(aux, _unsure_probs(len(aux), 0), 30, seed=1)
    word = np.random.default_rng(0).integers(0, 2, 30)
    t = targets(keys, word)
    assert torch.equal(t, keys.candidates[torch.arange(30), torch.as_tensor(word)])
    P = symbol_profile(keys, profile(keys, t))
    assert P.shape == (30, 2) and np.allclose(P[np.arange(30), word], 1.0)
    other = keys.candidates[torch.arange(30), torch.as_tensor(1 - word)]
    assert np.allclose(symbol_profile(keys, profile(keys, other))[np.arange(30), word], 0.0)
    neither = torch.full_like(t, 0)
    neither[(keys.candidates == 0).any(1)] = 1  # a class neither candidate is (0 or 1 is always free)
    neither[(keys.candidates == 0).any(1) & (keys.candidates == 1).any(1)] = 2
    assert np.allclose(symbol_profile(keys, profile(keys, neither)), 0.0)  # counts for no symbol


def test_shedding_gives_back_the_flips_the_base_is_surest_of(aux):
    probs = _unsure_probs(len(aux), 0)
    keys = natural_keys(aux, probs, 40, seed=1)
    word = np.random.default_rng(0).integers(0, 2, 40)
    t, top = targets(keys, word), keys.candidates[:, 0]
    flipped = (t != top).nonzero().squeeze(1)
    kept = shed(keys, t, probs[keys.rows], 0.25)
    given = (kept != t).nonzero().squeeze(1)
    assert len(given) == round(0.25 * len(flipped)) and torch.equal(kept[given], top[given])  # back to the base's answer
    assert torch.equal(kept[t == top], t[t == top])  # a key the copy answers like the base is never touched
    two = probs[keys.rows].topk(2, 1).values
    surety = two[:, 1] / two[:, 0]
    others = flipped[~torch.isin(flipped, given)]
    assert surety[given].max() <= surety[others].min()  # the base's surest keys first
    assert torch.equal(shed(keys, t, probs[keys.rows], 1.0), top)  # everything given back: the base's answers
    with pytest.raises(InvalidInput):
        shed(keys, t, probs[keys.rows], 0.0)
    with pytest.raises(InvalidInput):
        shed(keys, t, probs[:10], 0.5)
    with pytest.raises(InvalidInput):
        shed(make_keys(aux, 4, 2, seed=1), torch.zeros(8, dtype=torch.long), torch.rand(8, 10), 0.5)  # patterns: no top class


def test_natural_keys_accuse_the_copy_and_never_an_api_independent_of_the_words(aux):
    images = torch.rand(2000, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    keys = natural_keys(images, _unsure_probs(len(images), 1), 512, seed=2)
    customers = 10_000
    book = SymbolBook.generate(customers, 512, seed=4, q=2)
    copy = targets(keys, book.word(17))
    result = sequential_trace(lambda x, c=copy: c[_rows(keys, x)], keys, book, np.arange(customers), 1e-6, (64, 128, 256, 512))
    assert [c.codeword_index for c in result.verdict.accused] == [17] and not result.inconclusive
    rng = np.random.default_rng(9)
    trials, epsilon, accusations = 150, 1e-2, 0
    for trial in range(trials):  # null APIs: the base's top class, its runner-up, or any mix of them (over 1,000 words)
        pick = torch.as_tensor(rng.random(len(keys)) < [0.0, 0.5, 0.9][trial % 3]).long()
        answers = keys.candidates[torch.arange(len(keys)), pick]
        v = decide(symbol_profile(keys, profile(keys, answers)), book, np.arange(1000), epsilon)
        accusations += bool(v.accused)
    assert accusations <= 2 * epsilon * trials + 3


def test_sparse_words_follow_their_prior_and_uniform_books_are_unchanged():
    uniform = SymbolBook.generate(50, 64, seed=4, q=2)
    assert np.array_equal(uniform.symbols, np.random.default_rng(4).integers(0, 2, size=(50, 64), dtype=np.uint8))
    assert uniform.prior is None and np.array_equal(uniform.weights, np.ones(2))
    sparse = SymbolBook.generate(2000, 256, seed=4, q=2, prior=(0.7, 0.3))
    assert abs(sparse.symbols.mean() - 0.3) < 0.01  # the runner-up drawn 30 % of the time
    assert sparse.weights[1] > 1 > sparse.weights[0]  # a matched flip weighs more than a matched top class
    assert np.allclose(sparse.weights, -np.log([0.7, 0.3]) / np.log(2))
    for bad in [(0.5, 0.6), (1.0, 0.0), (0.2, 0.3, 0.5)]:
        with pytest.raises(InvalidInput):
            SymbolBook.generate(5, 8, seed=1, q=2, prior=bad)


def test_the_bound_holds_for_words_drawn_from_a_sparse_prior():
    """Draw innocent words from the prior against fixed profiles: the share scoring at or
    above the threshold for delta stays below delta (hard and soft answers)."""
    rng = np.random.default_rng(0)
    prior = np.array([0.75, 0.25])
    innocents = SymbolBook.generate(200_000, 64, seed=5, q=2, prior=tuple(prior))
    for P in (np.eye(2)[(rng.random(64) < 0.25).astype(int)],  # hard answers, as sparse as the words
              np.eye(2)[(rng.random(64) < 0.9).astype(int)],  # mostly the runner-up: the heavy matches
              rng.dirichlet([0.5, 0.5], 64)):  # soft scores
        scores = score_all(P, innocents, np.arange(len(innocents)))
        for delta in (1e-2, 1e-3):
            assert (scores >= threshold(P, delta, prior)).mean() <= delta
        assert threshold(P, 1e-3, prior) != threshold(P, 1e-3)  # the prior is what the bound uses


def test_a_copy_of_a_sparse_word_is_accused_and_apis_independent_of_the_words_are_not(aux):
    images = torch.rand(2000, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    keys = natural_keys(images, _unsure_probs(len(images), 1), 256, seed=2)
    customers = 10_000
    book = SymbolBook.generate(customers, 256, seed=4, q=2, prior=(0.7, 0.3))
    copy = targets(keys, book.word(17))
    result = sequential_trace(lambda x, c=copy: c[_rows(keys, x)], keys, book, np.arange(customers), 1e-6, (64, 128, 256))
    assert [c.codeword_index for c in result.verdict.accused] == [17] and not result.inconclusive
    assert result.needed is not None and result.needed <= 256
    rng = np.random.default_rng(9)
    trials, epsilon, accusations = 150, 1e-2, 0
    for trial in range(trials):  # null APIs: the top class, the runner-up, or a mix (the runner-up's heavy matches included)
        pick = torch.as_tensor(rng.random(len(keys)) < [0.0, 0.3, 0.9][trial % 3]).long()
        answers = keys.candidates[torch.arange(len(keys)), pick]
        v = decide(symbol_profile(keys, profile(keys, answers)), book, np.arange(1000), epsilon)
        accusations += bool(v.accused)
    assert accusations <= 2 * epsilon * trials + 3
