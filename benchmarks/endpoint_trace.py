"""Time black-box traces against a copy served by ``mlflow models serve``.

Serves ``models:/securemark-customer@customer-<id>`` with MLflow's own scoring server
(``--env-manager local``) on a free local port, then times, over HTTP with the MLflow
scoring protocol:

- ``trace --endpoint`` as a user runs it (:func:`flows.tracing.trace_endpoint`: queries,
  verdict, MLflow run and report), which stops at the first checkpoint that clears the
  bound;
- a full read of ``--queries`` answers (every key, repeated) scored under another
  vendor's keys, so no checkpoint ever stops it early: the worst case of a trace.

Needs the outputs of ``dvc repro issue`` (registered copies); run from the repository
root:

    python benchmarks/endpoint_trace.py --customer customer-0003 --queries 1024
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from flows.adapters import tracking
from flows.adapters.endpoint import PredictionAPI
from flows.adapters.paths import Paths
from flows.adapters.settings import Settings
from flows.adapters.vendor import open_vendor
from flows.tracing import trace_endpoint
from results_io import report  # sibling module: scripts run as python benchmarks/<name>.py
from securemark.key import null_secret

OUT = Path(__file__).resolve().parent / "results" / "endpoint_trace.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--customer", default="customer-0003")
    ap.add_argument("--queries", type=int, default=1024, help="answers in the full read (a multiple of the key count)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    paths = Paths.from_env()
    settings = Settings.load(paths.params)
    tracking.configure(paths)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{paths.root / 'mlflow.db'}"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/securemark-customer@customer-{args.customer}",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait(url, server)
        start = time.perf_counter()
        traced = trace_endpoint(paths, settings, url)
        trace_seconds = time.perf_counter() - start
        bb = settings.blackbox
        repeats = max(1, args.queries // bb.keys)
        vendor = open_vendor(paths, settings)
        probe = dataclasses.replace(vendor.api_probe(null_secret(settings.base.seed, "blackbox", 0)), repeats=repeats)
        api = PredictionAPI(url, "mlflow", bb.batch, bb.timeout, bb.retries, bb.max_response_bytes, budget=None)
        start = time.perf_counter()
        result = probe.trace(api.predict, settings.trace.epsilon)
        full_seconds = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(timeout=30)
    row = {"customer": args.customer, "accused": [a["customer_id"] for a in traced["accused"]], "trace_queries": traced["queries"],
           "trace_seconds": round(trace_seconds, 2), "full_read_queries": result.queries, "full_read_accused": len(result.verdict.accused),
           "full_read_seconds": round(full_seconds, 2)}
    report([row], args.out)


def _wait(url: str, server: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as ping:
                if ping.status == 200:
                    return
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"mlflow models serve did not answer at {url}")
        time.sleep(1)


if __name__ == "__main__":
    main()
