"""``make run``: the default pipeline (``dvc repro``) against one Prefect server.

    python -m flows.entry.pipeline [dvc repro arguments, e.g. a stage name]

Every stage is a Prefect flow. Without ``PREFECT_API_URL`` each stage's process would
start (and stop) a temporary Prefect server of its own, about 10 s each; this entry
starts one server on a free 127.0.0.1 port for the whole run (state in ``.prefect/``),
runs ``dvc repro`` with that server's URL, prints ``dvc metrics show`` and stops the
server, also on Ctrl-C or failure. With ``PREFECT_API_URL`` already set, that server is
used and nothing is started. The exit code is ``dvc repro``'s.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from flows.adapters.paths import Paths
from flows.adapters.servers import free_port, prefect_server


def _dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def _repro(args: list[str], env: dict[str, str]) -> int:
    start = time.perf_counter()
    code = subprocess.call(_dvc("repro", *args), env=env)
    if code == 0:
        subprocess.call(_dvc("metrics", "show"), env=env)
    print(f"dvc repro finished with exit code {code} in {time.perf_counter() - start:.0f} s", flush=True)
    return code


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    paths = Paths.from_env()
    os.chdir(paths.root)
    if os.environ.get("PREFECT_API_URL"):
        sys.exit(_repro(args, dict(os.environ)))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind like Ctrl-C: the server is stopped
    home = paths.root / ".prefect"
    with prefect_server(free_port(), home, log=home / "pipeline-server.log") as url:
        print(f"Prefect server for this run: {url} (log {home / 'pipeline-server.log'})", flush=True)
        code = _repro(args, {**os.environ, "PREFECT_API_URL": url, "PREFECT_HOME": str(home)})
    sys.exit(code)


if __name__ == "__main__":
    main()
