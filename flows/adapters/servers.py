"""Local servers for operators and tests: a Prefect API server and an MLflow tracking
server, started as child processes on 127.0.0.1, waited for with a bounded health
check, and stopped (terminate, then kill) on exit.

    with prefect_server(port=4200, home=Path(".prefect")) as api_url: ...
    with mlflow_server(port=5000, backend_uri="sqlite:///mlflow.db", artifacts=Path("mlruns")) as url: ...
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from securemark.errors import ServerFailed

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def _bin(name: str) -> str:
    """A console script of this environment (next to the running interpreter)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


@contextmanager
def _child(cmd: list[str], health_url: str, log: Path, env: dict[str, str], timeout: float) -> Iterator[None]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not healthy(health_url):
            if proc.poll() is not None:
                raise ServerFailed(f"{cmd[0]} exited with {proc.returncode} (its log: {log}): {_last_line(log)}")
            if time.monotonic() > deadline:
                raise ServerFailed(f"{' '.join(cmd[:3])} not healthy at {health_url} after {timeout:.0f} s (its log: {log}): {_last_line(log)}")
            time.sleep(0.5)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _last_line(log: Path) -> str:
    """The last non-empty line of a server's log: the reason, most of the time."""
    lines = [line.strip() for line in _tail(log).splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(empty log)"


def _tail(log: Path, chars: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


@contextmanager
def prefect_server(port: int, home: Path, timeout: float = 180.0, log: Path | None = None) -> Iterator[str]:
    """``prefect server start`` on 127.0.0.1:``port`` with state in ``home``; yields the API URL."""
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": f"http://{HOST}:{port}/api"}
    cmd = [_bin("prefect"), "server", "start", "--host", HOST, "--port", str(port)]
    with _child(cmd, f"http://{HOST}:{port}/api/health", log or home / "server.log", env, timeout):
        yield f"http://{HOST}:{port}/api"


@contextmanager
def mlflow_server(port: int, backend_uri: str, artifacts: Path, timeout: float = 120.0, log: Path | None = None) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1:``port`` over ``backend_uri``; yields its URL."""
    cmd = [_bin("mlflow"), "server", "--backend-store-uri", backend_uri, "--default-artifact-root", str(artifacts),
           "--host", HOST, "--port", str(port), "--workers", "1"]
    with _child(cmd, f"http://{HOST}:{port}/health", log or artifacts.parent / "mlflow-server.log", dict(os.environ), timeout):
        yield f"http://{HOST}:{port}"
