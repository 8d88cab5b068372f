"""Code families: shapes, reproducibility, persistence and each family's structure."""

from __future__ import annotations

import math

import numpy as np
import pytest

from securemark import codes
from securemark.codes import Codebook, available_codes, create_code


@pytest.mark.parametrize("name", available_codes())
def test_every_family_generates_reproducible_codebooks_that_round_trip(name, tmp_path):
    family = create_code(name)
    book = family.generate(64, seed=11)

    assert isinstance(book, Codebook) and book.family == name
    m = book.length
    assert len(book) == 64
    assert book.packed.dtype == np.uint8 and book.packed.shape == (64, math.ceil(m / 8))
    assert book.biases.dtype == np.float64 and book.biases.shape == (m,)
    assert np.all((book.biases > 0) & (book.biases < 1))
    words = book.words(np.arange(64))
    assert words.shape == (64, m) and set(np.unique(words)) <= {0, 1}
    assert np.array_equal(book.word(5), words[5])
    assert np.array_equal(np.packbits(words, axis=1, bitorder="little"), book.packed)  # padding bits are zero
    assert len({w.tobytes() for w in words}) == 64  # distinct customers get distinct words

    again = family.generate(64, seed=11)
    assert np.array_equal(again.packed, book.packed) and np.array_equal(again.biases, book.biases)
    assert not np.array_equal(family.generate(64, seed=12).packed, book.packed)
    # a smaller code book is a prefix of a larger one issued with the same seed
    assert np.array_equal(family.generate(10, seed=11).packed, book.packed[:10])

    path = tmp_path / f"{name}.npz"
    book.save(path)
    with np.load(path, allow_pickle=False) as raw:  # must load without pickle
        assert set(raw.files) >= {"packed", "biases", "params"}
    loaded = Codebook.load(path)
    assert (loaded.family, loaded.length, loaded.seed, loaded.params) == (name, m, 11, book.params)
    assert np.array_equal(loaded.packed, book.packed) and np.array_equal(loaded.biases, book.biases)
    with pytest.raises(ValueError):
        book.packed[0, 0] = 1  # code books are immutable


def test_unknown_family_lists_valid_names():
    with pytest.raises(ValueError) as info:
        create_code("nope")
    for name in ("bibd", "random", "tardos"):
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("name", "cfg", "param"),
    [
        ("tardos", {"code_length": 0}, "code_length"),
        ("tardos", {"max_colluders": 0}, "max_colluders"),
        ("tardos", {"epsilon": 1.5}, "epsilon"),
        ("tardos", {"cutoff": 0.5}, "cutoff"),
        ("bibd", {"order": 4}, "order"),
        ("bibd", {"order": 1}, "order"),
        ("random", {"code_length": -3}, "code_length"),
        ("random", {"colour": 3}, "colour"),
    ],
)
def test_invalid_parameters_name_the_parameter(name, cfg, param):
    with pytest.raises(ValueError, match=param):
        create_code(name, **cfg)


@pytest.mark.parametrize("name", available_codes())
@pytest.mark.parametrize(("capacity", "seed"), [(0, 1), (5, -1)])
def test_generate_rejects_bad_capacity_or_seed(name, capacity, seed):
    with pytest.raises(ValueError, match="capacity" if capacity < 1 else "seed"):
        create_code(name).generate(capacity, seed)


@pytest.mark.parametrize(("max_colluders", "cutoff"), [(4, None), (2, None), (4, 0.05)])
def test_tardos_biases_follow_the_cut_off_arcsine_law(max_colluders, cutoff):
    family = create_code("tardos", code_length=4000, max_colluders=max_colluders, cutoff=cutoff)
    t = cutoff if cutoff is not None else 1 / (300 * max_colluders)
    p = family.generate(1, seed=3).biases
    assert p.min() >= t and p.max() <= 1 - t
    # arcsine law: r = arcsin(sqrt(p)) is uniform on [t', pi/2 - t']
    t_prime = math.asin(math.sqrt(t))
    r = (np.arcsin(np.sqrt(p)) - t_prime) / (math.pi / 2 - 2 * t_prime)
    assert np.abs(np.sort(r) - np.linspace(0, 1, r.size)).max() < 0.04  # Kolmogorov-Smirnov, n=4000
    assert abs(p.mean() - 0.5) < 0.03


def test_tardos_bits_have_the_stated_biases_and_large_capacity_is_cheap():
    book = create_code("tardos", code_length=304).generate(30_000, seed=5)  # crosses a chunk boundary
    means = book.words(slice(None)).mean(axis=0)
    sd = np.sqrt(book.biases * (1 - book.biases) / len(book))
    assert np.all(np.abs(means - book.biases) < 5 * sd + 1e-12)
    # positions are independent draws: bits of two positions are uncorrelated
    words = book.words(slice(None)).astype(float)
    corr = np.corrcoef(words[:, :50], rowvar=False)
    assert np.abs(corr[np.triu_indices(50, 1)]).max() < 0.04


def test_codebook_does_not_depend_on_thread_count(monkeypatch):
    family = create_code("tardos", code_length=512)
    rows_per_chunk = codes._CHUNK_BITS // 512
    capacity = 2 * rows_per_chunk + 17  # three chunks, so four threads really split the work
    monkeypatch.setattr(codes, "_workers", lambda: 4)  # pinned: the machine's core count must not decide the test
    threaded = family.generate(capacity, seed=9).packed
    monkeypatch.setattr(codes, "_workers", lambda: 1)
    assert np.array_equal(family.generate(capacity, seed=9).packed, threaded)


@pytest.mark.parametrize("name", ["tardos", "random"])
def test_large_capacity(name):
    book = create_code(name, code_length=128).generate(12_000, seed=1)
    assert len(book) == 12_000
    assert len({row.tobytes() for row in book.packed}) == 12_000


def test_random_code_is_unbiased():
    book = create_code("random", code_length=301).generate(20_000, seed=2)
    assert np.all(book.biases == 0.5)
    assert abs(book.words(slice(None)).mean() - 0.5) < 0.002


@pytest.mark.parametrize("q", [2, 3, 5, 7])
def test_bibd_words_follow_the_projective_plane(q):
    v = q * q + q + 1
    book = create_code("bibd", order=q).generate(v, seed=4)
    assert book.length == v and len(book) == v
    zeros = 1 - book.words(slice(None)).astype(int)  # zeros of a word = its block
    assert np.all(zeros.sum(axis=1) == q + 1)  # k = q + 1 points per block
    assert np.all(zeros.sum(axis=0) == q + 1)  # r = q + 1 blocks per point
    overlap = zeros @ zeros.T
    off_diagonal = overlap[~np.eye(v, dtype=bool)]
    assert np.all(off_diagonal == 1)  # lambda = 1: two blocks share exactly one point
    assert np.allclose(book.biases, q * q / v)
    # the seed only permutes blocks over customers
    other = create_code("bibd", order=q).generate(v, seed=5)
    assert sorted(map(bytes, other.packed)) == sorted(map(bytes, book.packed))


def test_bibd_rejects_more_customers_than_blocks():
    family = create_code("bibd", order=5)
    family.generate(31, seed=0)
    with pytest.raises(ValueError, match="capacity"):
        family.generate(32, seed=0)


def test_codebook_rejects_inconsistent_arrays():
    with pytest.raises(ValueError, match="packed"):
        Codebook("x", 10, np.zeros((3, 1), np.uint8), np.full(10, 0.5), 0)
    with pytest.raises(ValueError, match="biases"):
        Codebook("x", 10, np.zeros((3, 2), np.uint8), np.full(9, 0.5), 0)
