"""Stage entry points as DVC runs them: clear errors on bad input, and `dvc repro`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO, make_project, small_params

pytestmark = pytest.mark.integration


def _stage(module: str, root, env_extra=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "SECUREMARK_ROOT": str(root), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", module], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_impossible_params_rejected_before_any_work(tmp_path, raw_dataset):
    """The stage process's contract (exit 2, the key named in one line, nothing written), once:
    which values are impossible, and that each names its key, is tests/unit/test_partition.py's
    and test_settings.py's (in-process, for every key)."""
    key = "prepare.mode"
    params = small_params(prepare={"mode": "zipf"})
    paths = make_project(tmp_path, raw_dataset, params)
    proc = _stage("flows.prepare", tmp_path)
    assert proc.returncode == 2
    assert key in proc.stderr and "Traceback" not in proc.stderr
    assert not paths.partitions.exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_dvc_repro_runs_data_stages_in_a_copy_of_the_repo(tmp_path, raw_dataset, prefect_harness):
    import prefect.settings

    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    root = tmp_path / "repo"
    for f in files:
        if (REPO / f).is_file():
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, root / f)
    params = small_params(prepare={"owners": 3})  # dvc.yaml lists owner_1..owner_3
    make_project(root, raw_dataset, params)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    venv_bin = os.path.dirname(sys.executable)  # stages call `python`, as under `make run`
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "PATH": f"{venv_bin}:{os.environ['PATH']}",
           "PREFECT_API_URL": str(prefect.settings.PREFECT_API_URL.value())}  # the session's server, as `make run` gives its stages one
    env.pop("SECUREMARK_ROOT", None)
    dvc = [sys.executable, "-m", "dvc"]
    proc = subprocess.run([*dvc, "repro", "validate"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert {"prepare", "validate"} <= set(lock["stages"])
    status = subprocess.run([*dvc, "status", "validate"], cwd=root, env=env, capture_output=True, text=True)
    assert "up to date" in status.stdout.lower(), status.stdout
    assert (root / "data/partitions/owner_3/manifest.csv").is_file()
