"""Decoders: the peeling decoder never accuses innocents on codes with no colluders, and
catches more colluders of a large averaging coalition than the one-shot decoder."""

import json

import numpy as np
import pytest

from securemark.codes import create_code
from securemark.tracing import available_decoders, create_decoder, decide, decide_peeling

N, M = 1000, 304


def coalition_y(codebook, colluders, rng, noise=0.03):
    s = 2.0 * codebook.words(colluders) - 1.0
    return 0.2 * s.mean(0) + rng.normal(0, noise, codebook.length)


def test_registry_lists_both_decoders_and_rejects_unknown():
    assert available_decoders() == ["peeling", "plain"]
    with pytest.raises(ValueError, match="peeling"):
        create_decoder("viterbi")


@pytest.mark.parametrize("decoder", ["plain", "peeling"])
def test_no_colluders_no_accusation(decoder):
    """y independent of every code word (an un-fingerprinted model): nobody, ever."""
    rng = np.random.default_rng(0)
    codebook = create_code("random", code_length=M).generate(N, seed=1)
    for _ in range(40):
        verdict = create_decoder(decoder)(rng.normal(size=M), codebook, np.arange(N), 1e-3)
        assert verdict.accused == []


def test_peeling_catches_more_of_a_large_coalition_without_innocents():
    rng = np.random.default_rng(3)
    plain_caught = peel_caught = 0
    for trial in range(6):
        codebook = create_code("random", code_length=M).generate(N, seed=trial)
        colluders = rng.choice(N, 8, replace=False)
        y = coalition_y(codebook, colluders, rng)
        for fn in (decide, decide_peeling):
            accused = {c.codeword_index for c in fn(y, codebook, np.arange(N)).accused}
            assert accused <= set(colluders.tolist())  # no innocent accused
            if fn is decide:
                plain_caught += len(accused)
            else:
                peel_caught += len(accused)
    assert peel_caught > plain_caught


def test_single_copy_is_accused_alone_with_small_p_value():
    rng = np.random.default_rng(5)
    codebook = create_code("random", code_length=M).generate(N, seed=9)
    verdict = decide_peeling(coalition_y(codebook, [42], rng), codebook, np.arange(N))
    assert [c.codeword_index for c in verdict.accused] == [42]
    assert verdict.accused[0].family_p < 1e-6
    json.dumps(verdict.to_dict())
