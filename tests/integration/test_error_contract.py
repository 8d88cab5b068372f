"""One error contract at every entry point: invalid input or configuration exits 2 with
one line on stderr, no traceback, whichever entry point meets it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import small_params

pytestmark = pytest.mark.integration


def _run(args: list[str], root, params: dict) -> subprocess.CompletedProcess:
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "SECUREMARK_ROOT": str(root), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    for var in ("SECUREMARK_SECRET_FILE", "SECUREMARK_VENDOR_DIR"):
        env.pop(var, None)
    return subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def _assert_one_line_exit_2(proc: subprocess.CompletedProcess, named: str) -> None:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("securemark:")]
    assert len(lines) == 1 and named in lines[0], proc.stderr[-2000:]


def test_cli_bogus_scorer_flag(tmp_path):
    proc = _run(["-m", "flows.entry.cli", "trace", "--model", str(tmp_path / "m.safetensors"), "--scorer", "bogus"], tmp_path, small_params())
    _assert_one_line_exit_2(proc, "bogus")


def test_cli_bogus_decoder_in_params(tmp_path):
    proc = _run(["-m", "flows.entry.cli", "trace", "--model", str(tmp_path / "m.safetensors")], tmp_path, small_params(trace={"decoder": "bogus"}))
    _assert_one_line_exit_2(proc, "decoder")


def test_attack_stage_bogus_attack_in_the_grid(tmp_path):
    params = small_params(attack={"grid": [{"attack": "bogus", "strength": 3}]})
    proc = _run(["-m", "flows.attack"], tmp_path, params)
    _assert_one_line_exit_2(proc, "bogus")


def test_issue_stage_bogus_code_family(tmp_path):
    params = small_params(fingerprint={"code": {"family": "hamming", "capacity": 10}})
    proc = _run(["-m", "flows.issue"], tmp_path, params)
    _assert_one_line_exit_2(proc, "hamming")


def test_the_cli_exits_with_the_stages_code_and_help_loads_no_torch():
    """The CLI's exit code for invalid input is the stages' one, and ``--help`` answers
    without importing torch (it must be fast: lazy imports on the CLI path)."""
    from flows.adapters import stage
    from flows.entry import cli

    assert cli.EXIT_INVALID == stage.EXIT_INVALID == 2
    proc = subprocess.run([sys.executable, "-c", "import sys, flows.entry.cli as c\n"
                           "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "False", proc.stdout + proc.stderr
