"""Shared fixtures.

Heavy things are built once per session and copied per test:
- a Prefect test harness (one temporary server for the whole session);
- the real Fashion-MNIST, staged by ``make test``'s set-up under ``data/raw``;
- a small project (tiny partitions of the real data) prepared once.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml

import flows  # noqa: F401  (sets project-local Prefect/DVC/GX defaults)
from flows.adapters.paths import Paths
from flows.adapters.settings import Settings, load_params
from securemark import data as fmnist

REPO = Path(__file__).resolve().parents[1]

# Under pytest-xdist (`make test` runs two workers on this 2-core machine), each worker and
# every process it starts gets its share of the cores, so that workers do not fight over them
# and a test comparing in-process with multi-process results sees the same thread count.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = str(max(1, (os.cpu_count() or 1) // _WORKERS))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = _THREADS
    torch.set_num_threads(int(_THREADS))

# A tiny profile of every stage (seconds per stage on 2 cores): the committed
# params.yaml with these keys overridden, so the tests follow the real schema.
SMALL_OVERRIDES = {
    "base": {"seed": 7, "profile": "default"},  # the sections below replace the default profile's values
    "prepare": {"owners": 2, "owner_size": 300, "aux_size": 200, "attacker_size": 200, "test_size": 500},
    "model": {"widths": [8, 16], "hidden": [32], "cut": 1},
    "train": {"epochs": 2, "batch_size": 64, "lr": 0.004, "local_steps": 3, "transport": "inprocess"},
    "defence": {"alpha": 0.5, "sigma": 0.1},
    "privacy_audit": {"sample": 100, "attackers": {"decoder": {"epochs": 2}, "strong_decoder": {"epochs": 1, "width": 8, "blocks": 1},
                                                   "fora": {"epochs": 1, "width": 8, "blocks": 1, "substitute_epochs": 1}, "inversion": {"steps": 20}}},
    "vendor": {"secret_file": "secrets/vendor.key", "state_dir": "vendor", "create_secret": True},
    "fingerprint": {
        "code": {"family": "random", "capacity": 50, "code_length": 64},
        "batch_size": 64,
        "max_steps": 3000,
        "accuracy_tolerance": 0.1,
        "eval_rows": 200,
    },
    "blackbox": {"natural_keys": 64, "patterns": 16, "per_pattern": 4, "checkpoints": [32, 64], "null_secrets": 2, "cost_copies": 1, "distill_trials": 1},
    "issue": {"customers": 2},
    "trace": {"null_random_keys": 2, "drift_samples": 6},
    "attacker": {"budget": 100, "budgets": [100, 200], "min_steps": 10},
    "attack": {"targets": 1, "trials": 1, "coalition_sizes": [2], "grid": [{"attack": "fine_tune", "epochs": 1}]},
    # the `full` profile, tiny too (what the robustness-audit deployment runs)
    "profiles": {"full": {"attacker": {"budgets": [100, 200]}, "trace": {"null_random_keys": 2}, "blackbox": {"null_secrets": 2, "cost_copies": 1, "distill_trials": 1},
                          "attack": {"targets": 1, "trials": 1, "coalition_sizes": [2], "grid": [{"attack": "quantize", "bits": 8}]}}},
}


def merged(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` applied key by key (mappings merge, other values replace)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("code",):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def small_params(**sections) -> dict:
    """The committed params.yaml with the tiny profile, then ``sections`` on top (a fresh dict)."""
    return merged(merged(load_params(REPO / "params.yaml"), SMALL_OVERRIDES), sections)


SMALL_PARAMS = small_params()
SMALL = Settings.from_params(SMALL_PARAMS)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is faster than two fighting over shared cores
    (a module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def raw_dataset() -> Path:
    """The staged real dataset (make test stages it; staged here if run bare)."""
    raw = REPO / "data" / "raw"
    try:
        fmnist.ensure_staged(raw, allow_download=False)
    except fmnist.DatasetMissingError as exc:
        pytest.skip(str(exc))
    return raw


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def make_project(root: Path, raw: Path, params: dict) -> Paths:
    root.mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    link = root / "data" / "raw"
    if not link.exists():
        link.symlink_to(raw, target_is_directory=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return Paths(root)


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow-test.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def prepared_project(tmp_path_factory, raw_dataset, prefect_harness) -> Paths:
    """A small project with partitions written by the real prepare flow (once)."""
    from flows.prepare import prepare_flow

    root = tmp_path_factory.mktemp("prepared")
    paths = make_project(root, raw_dataset, SMALL_PARAMS)
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    try:
        prepare_flow(paths, SMALL)
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old
    return paths


@pytest.fixture
def project_copy(prepared_project, tmp_path) -> Paths:
    """A private copy of the prepared project that a test may corrupt."""
    root = tmp_path / "project"
    shutil.copytree(prepared_project.root, root, symlinks=True, ignore=shutil.ignore_patterns("mlflow.db", "mlruns"))
    return Paths(root)


PROJECT_ENV_VARS = ("SECUREMARK_SECRET_FILE", "SECUREMARK_VENDOR_DIR", "SECUREMARK_ROOT", "SECUREMARK_DASK_ADDRESS")


@contextmanager
def isolated_copy(prepared: Paths, root: Path) -> Iterator[tuple[Paths, pytest.MonkeyPatch]]:
    """Copy the prepared project to ``root`` (without its MLflow store) and, while the
    block runs, point MLflow at the copy's own SQLite file and clear the SecureMark
    variables that could point elsewhere. Yields the copy and the monkeypatch."""
    shutil.copytree(prepared.root, root, symlinks=True, ignore=shutil.ignore_patterns("mlflow.db", "mlruns"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        for var in PROJECT_ENV_VARS:
            mp.delenv(var, raising=False)
        yield Paths(root), mp
