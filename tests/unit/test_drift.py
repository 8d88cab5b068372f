"""The drift-whitened reading: a Kronecker model of the drift, fitted to simulated updates,
finds a mark that structured drift hides from the plain reading; deciding on several
readings splits epsilon and never accuses an innocent."""

import json

import numpy as np
import pytest
import torch

from securemark.codes import create_code
from securemark.errors import InvalidConfig, InvalidInput
from securemark.tracing import DriftModel, decide_readings, fit_drift

ROWS, COLS, M, N = 32, 32, 128, 500


def structured_drift(rng, n):
    """Drift with the readout's shape: energy falling off steeply over the columns (the
    data's most excited directions) and correlated across rows."""
    col_scale = 8.0 * np.exp(-np.arange(COLS) / 2.0) + 0.05
    mixing = np.eye(ROWS) + 0.8 * rng.normal(size=(ROWS, ROWS)) / np.sqrt(ROWS)
    return np.stack([(mixing @ rng.normal(size=(ROWS, COLS))) * col_scale for _ in range(n)]).reshape(n, -1)


def marked(codebook, key, colluders, strength):
    """A min-norm readout change that moves K phi towards the colluders' average word."""
    s = (2.0 * codebook.words(colluders) - 1.0).mean(0)
    return strength * key.T @ np.linalg.solve(key @ key.T, s)


def test_fit_recovers_the_structure_and_round_trips():
    rng = np.random.default_rng(0)
    model = fit_drift(structured_drift(rng, 60), ROWS, shrink=0.1)
    assert model.shape == (ROWS, COLS) and model.samples == 60
    col_gain = torch.diag(model.col_white)
    assert col_gain[-1] > 5 * col_gain[0]  # the quiet columns are weighted up
    again = DriftModel.from_tensors(model.tensors())
    phi = torch.randn(ROWS * COLS, dtype=torch.float64)
    assert torch.allclose(again.whiten(phi), model.whiten(phi))


def test_whitened_reading_finds_what_drift_hides_and_accuses_no_innocent():
    rng = np.random.default_rng(1)
    codebook = create_code("random", code_length=M).generate(N, seed=2)
    key = rng.normal(size=(M, ROWS * COLS)) / np.sqrt(ROWS * COLS)
    model = fit_drift(structured_drift(rng, 60), ROWS, shrink=0.1)
    whiten = lambda phi: model.whiten(torch.as_tensor(phi)).numpy()  # noqa: E731
    plain_hits = drift_hits = 0
    for trial in range(6):
        colluders = rng.choice(N, 4, replace=False)
        phi = marked(codebook, key, colluders, 1.5) + structured_drift(rng, 1)[0]
        readings = {"plain": key @ phi, "drift": key @ whiten(phi)}
        verdict = decide_readings(readings, codebook, np.arange(N), 1e-3)
        accused = {c.codeword_index for c in verdict.accused}
        assert accused <= set(colluders.tolist())
        plain_hits += verdict.readings["plain"] > 0
        drift_hits += verdict.readings["drift"] > 0
        json.dumps(verdict.to_dict())
    assert drift_hits >= 5 and plain_hits <= 2


def test_readings_split_epsilon_and_never_accuse_on_unmarked_models():
    rng = np.random.default_rng(4)
    codebook = create_code("random", code_length=M).generate(N, seed=5)
    model = fit_drift(structured_drift(rng, 30), ROWS)
    key = rng.normal(size=(M, ROWS * COLS))
    for _ in range(30):
        phi = structured_drift(rng, 1)[0]
        verdict = decide_readings({"plain": key @ phi, "drift": key @ model.whiten(torch.as_tensor(phi)).numpy()},
                                  codebook, np.arange(N), 1e-3)
        assert verdict.accused == [] and set(verdict.readings) == {"plain", "drift"} and verdict.epsilon == 1e-3
    single = decide_readings({"plain": rng.normal(size=M)}, codebook, np.arange(N), 1e-3)
    both = decide_readings({"a": rng.normal(size=M), "b": rng.normal(size=M)}, codebook, np.arange(N), 1e-3)
    assert both.threshold > single.threshold  # each of two readings decides at epsilon / 2


def test_bad_inputs_are_refused():
    with pytest.raises(InvalidInput, match="updates"):
        fit_drift(np.zeros((1, ROWS * COLS)), ROWS)
    with pytest.raises(InvalidInput, match="did not move"):
        fit_drift(np.zeros((5, ROWS * COLS)), ROWS)
    with pytest.raises(InvalidConfig, match="drift_shrink"):
        fit_drift(np.ones((5, ROWS * COLS)), ROWS, shrink=0.0)
    model = fit_drift(np.random.default_rng(0).normal(size=(5, ROWS * COLS)), ROWS)
    with pytest.raises(InvalidInput, match="expects a readout"):
        model.whiten(torch.zeros(7))
    with pytest.raises(InvalidInput, match="no reading"):
        decide_readings({}, create_code("random", code_length=M).generate(10, seed=0), np.arange(10))
