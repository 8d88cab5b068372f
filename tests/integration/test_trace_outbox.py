"""The trace outbox (flows.adapters.trace_log): a queued trace record becomes exactly one
MLflow run (real SQLite store), a record that could not be logged stays queued, and a
record claimed by a drainer that died is logged by the next one."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from mlflow import MlflowClient

from flows.adapters import reports, trace_log
from flows.adapters.paths import Paths
from flows.adapters.tracking import TRACE_EXPERIMENT
from securemark.codes import create_code
from securemark.key import FingerprintKey
from securemark.tracing import Verdict
from securemark.vendor import TraceConfig

pytestmark = pytest.mark.integration


@pytest.fixture
def paths(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return Paths(tmp_path)


def _entry(model: str = "suspect.safetensors") -> dict:
    """The record of a real report (reports.verdict_report) on a small codebook."""
    codebook = create_code("random", code_length=64).generate(100, seed=1)
    key = FingerprintKey.for_secret(bytes(range(32)), "server.dense1.linear.weight", 64, 1000)
    verdict = Verdict("correlation", 1e-6, 7.3, 100, [], [], np.linspace(-3, 3, 100))
    report = {**reports.verdict_report(verdict, {}, key, codebook, model, "ab" * 32), "trace_id": "t-" + model}
    return trace_log.record(report, verdict, np.arange(100), TraceConfig(drift_samples=0), key.key_id, {"model": model, "trace_id": report["trace_id"]})


def _runs(paths: Paths) -> list:
    client = MlflowClient(f"sqlite:///{paths.mlflow_db}")
    experiment = client.get_experiment_by_name(TRACE_EXPERIMENT)
    return [] if experiment is None else client.search_runs([experiment.experiment_id])


def test_a_queued_record_becomes_one_run_and_leaves_the_outbox(paths):
    queued = trace_log.queue(paths, _entry())
    assert oct(queued.stat().st_mode & 0o777) == "0o600"
    assert trace_log.drain(paths) == 1 and not queued.exists()
    (run,) = _runs(paths)
    assert run.data.tags["trace_id"] == "t-suspect.safetensors"
    artifacts = {a.path for a in MlflowClient(f"sqlite:///{paths.mlflow_db}").list_artifacts(run.info.run_id)}
    assert {"trace_report.json", "trace_report.md", "scores.png"} <= artifacts
    assert trace_log.drain(paths) == 0 and len(_runs(paths)) == 1  # logged once


def test_a_record_that_cannot_be_logged_stays_queued(paths, monkeypatch):
    queued = trace_log.queue(paths, _entry())

    def store_down(*_):
        raise RuntimeError("database is locked")

    monkeypatch.setattr(trace_log, "log_record", store_down)
    assert trace_log.drain(paths) == 0 and queued.exists()


def test_a_record_claimed_by_a_dead_drainer_is_logged_by_the_next(paths):
    queued = trace_log.queue(paths, _entry())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    claimed = queued.with_name(f"{queued.name}.claimed-{int(dead.stdout)}")
    os.rename(queued, claimed)
    assert trace_log.drain(paths) == 1
    assert not claimed.exists() and not queued.exists() and len(_runs(paths)) == 1
