"""How long the ``securemark`` command takes: ``--help``, a file trace and an API trace.

Each command runs as a user would run it (a fresh process, no Prefect server), ``--repeats``
times, ``--pause`` seconds apart so that the background process writing the previous
trace's MLflow run (flows.adapters.trace_log) has finished; the vendor state is warmed by
one trace first (the extractor and the drift model are built once per vendor state). The
API trace reads a copy served on 127.0.0.1 (flows.adapters.api_server). Beside each file
trace, a bare ``python -c "import torch"`` is timed (``torch_import``): the fixed part of
every command that reads a model, and the measure of how fast the machine is at that
moment (on the 2-core machine it has taken from 1.3 to 2.8 s on the same day). Needs the
pipeline's outputs and an issued copy; run from the repository root with the vendor's
secret (``SECUREMARK_SECRET_FILE`` / ``SECUREMARK_VENDOR_DIR``):

    python benchmarks/cli_speed.py --customer customer-0003
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_io import report  # noqa: E402  (sibling module: scripts run as python benchmarks/<name>.py)

OUT = Path(__file__).resolve().parent / "results" / "cli_speed.json"


def timed(args: list[str], env: dict) -> tuple[float, int]:
    start = time.perf_counter()
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    return time.perf_counter() - start, done.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--customer", default="customer-0003", help="an issued customer whose copy is traced")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pause", type=float, default=15.0, help="seconds between runs (the background MLflow writer finishes)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    from flows.adapters.api_server import serve_predictions
    from flows.adapters.paths import Paths
    from securemark.weights import load_weights

    paths = Paths.from_env()
    copy = paths.customer_copy(args.customer)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    cli = [sys.executable, "-m", "flows.entry.cli"]
    rows = {"help": [], "torch_import": [], "trace_file": [], "trace_endpoint": []}
    for _ in range(args.repeats):
        rows["help"].append(timed(cli + ["--help"], env)[0])
    seconds, code = timed(cli + ["trace", "--model", str(copy)], env)  # warm the vendor state once
    print(f"warm-up file trace: {seconds:.2f} s, exit {code}", flush=True)
    for _ in range(args.repeats):
        time.sleep(args.pause)
        seconds, code = timed(cli + ["trace", "--model", str(copy)], env)
        rows["trace_file"].append(seconds)
        rows["torch_import"].append(timed([sys.executable, "-c", "import torch"], env)[0])  # after the trace: it runs as before, after the pause
        print(f"file trace: {seconds:.2f} s, exit {code}", flush=True)
    model = load_weights(copy).eval()
    lock = threading.Lock()

    def answer(x):
        with lock:
            return model(x)

    with serve_predictions(answer) as url:
        for _ in range(args.repeats):
            time.sleep(args.pause)
            seconds, code = timed(cli + ["trace", "--endpoint", url], env)
            rows["trace_endpoint"].append(seconds)
            print(f"endpoint trace: {seconds:.2f} s, exit {code}", flush=True)
    time.sleep(args.pause)
    summary = {name: {"runs": [round(s, 2) for s in runs], "median": round(statistics.median(runs), 2)} for name, runs in rows.items()}
    report({"customer": args.customer, "repeats": args.repeats, "pause_seconds": args.pause, **summary}, args.out)


if __name__ == "__main__":
    main()
