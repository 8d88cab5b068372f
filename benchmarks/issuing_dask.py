"""Issuing at scale on a Dask cluster, with a worker killed mid-run.

Starts a ``LocalCluster`` (``--workers`` processes, one thread each), points the issue
flow at it (``SECUREMARK_DASK_ADDRESS``) and issues ``--copies`` customers under a
fresh vendor secret, in a temporary project that links the pipeline's data (its own
MLflow store, ledger and copies). Once ``--kill-after`` of the copies are on disk, one
worker process is killed (SIGKILL: no clean-up); Dask's nanny restarts it and the lost
batch runs again. Afterwards it checks that every customer has exactly one code word
(ledger), one registered model version (alias ``customer-<id>``) and one copy file whose
hash the ledger records, and counts duplicates and half entries (a pending ledger
record, a version or a file without the other two). Reports seconds per copy and bytes
stored per copy (copy file + registry artifacts).

    python benchmarks/issuing_dask.py --copies 1000 --workers 2
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from issuing import linked_project  # noqa: E402  (sibling module)
from results_io import report  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "issuing_dask.json"


def kill_one_worker(client, copies_dir: Path, threshold: int, done: threading.Event, log: list) -> None:
    """Wait until ``threshold`` copies exist, then SIGKILL one worker process."""
    while not done.is_set():
        count = sum(1 for _ in copies_dir.glob("*/model.safetensors")) if copies_dir.is_dir() else 0
        if count >= threshold:
            pids = client.run(os.getpid)
            address, pid = sorted(pids.items())[0]
            os.kill(pid, signal.SIGKILL)
            log.append({"killed_worker": address, "pid": pid, "copies_on_disk": count, "at_seconds": time.perf_counter()})
            return
        time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--kill-after", type=float, default=0.3, help="share of the copies on disk when a worker is killed")
    ap.add_argument("--task", type=int, default=None, help="customers per task (default: params issue.task)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    root = Path.cwd().resolve()

    from distributed import Client, LocalCluster
    from mlflow import MlflowClient

    from flows.adapters import tracking
    from flows.adapters.model_registry import BASE_MODEL, CUSTOMER_MODEL, log_classifier
    from flows.adapters.paths import Paths
    from flows.adapters.settings import Settings
    from flows.adapters.vendor import open_vendor
    from flows.issue import run_issue
    from securemark.weights import sha256_file

    with tempfile.TemporaryDirectory(prefix="securemark-dask-") as tmp:
        project = linked_project(root, Path(tmp) / "project")
        os.environ.update(MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}", SECUREMARK_SECRET_FILE=str(Path(tmp) / "secret.key"),
                          SECUREMARK_VENDOR_DIR=str(Path(tmp) / "vendor"), SECUREMARK_ROOT=str(project))
        paths = Paths(project)
        settings = Settings.load(paths.params)
        if args.task:
            settings = dataclasses.replace(settings, issue=dataclasses.replace(settings.issue, task=args.task))
        with tracking.run("base", tracking.TRAIN_EXPERIMENT, paths):  # the flow issues from the registered base (@latest)
            log_classifier(paths.base_model, BASE_MODEL)
        ids = [f"dask-{i:05d}" for i in range(args.copies)]
        with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None) as cluster, \
                Client(cluster) as client:
            os.environ["SECUREMARK_DASK_ADDRESS"] = cluster.scheduler_address
            done, killed = threading.Event(), []
            killer = threading.Thread(target=kill_one_worker, args=(client, paths.customers, int(args.kill_after * args.copies), done, killed), daemon=True)
            start = time.perf_counter()
            killer.start()
            error = None
            try:
                rows = run_issue(paths, settings, ids)
            except Exception as exc:  # reported, then the state is checked all the same
                rows, error = [], f"{type(exc).__name__}: {str(exc)[:500]}"
            wall = time.perf_counter() - start
            done.set()
            for entry in killed:
                entry["at_seconds"] = round(entry["at_seconds"] - start, 1)  # into the run
        # what is left behind
        vendor = open_vendor(paths, settings)
        records = vendor.ledger.records()
        per_customer = Counter(r.customer_id for r in records)
        indices = Counter(r.codeword_index for r in records)
        mlflow = MlflowClient()
        versions = mlflow.search_model_versions(f"name='{CUSTOMER_MODEL}'", max_results=100000)
        versions_per_customer = Counter(v.tags.get("customer_id") for v in versions)
        files = {c: paths.customer_copy(c) for c in ids if paths.customer_copy(c).is_file()}
        issued = {r.customer_id: r for r in records if r.status == "issued"}
        duplicates = sum(n - 1 for n in per_customer.values() if n > 1) + sum(n - 1 for n in indices.values() if n > 1) \
            + sum(n - 1 for n in versions_per_customer.values() if n > 1)
        half = sum(1 for r in records if r.status != "issued") \
            + sum(1 for c in versions_per_customer if c not in issued) \
            + sum(1 for c in files if c not in issued) \
            + sum(1 for c, r in issued.items() if c not in files or sha256_file(files[c]) != r.weights_sha256) \
            + sum(1 for c in issued if versions_per_customer.get(c, 0) == 0)
        aliases_ok = sum(1 for c in issued if mlflow.get_model_version_by_alias(CUSTOMER_MODEL, f"customer-{c}").tags.get("customer_id") == c)
        copy_bytes = sum(f.stat().st_size for f in files.values())
        artifact_bytes = sum(f.stat().st_size for f in (project / "mlruns").rglob("*") if f.is_file() and "securemark-issue" in str(f)) \
            if (project / "mlruns").is_dir() else 0
    result = {"copies": args.copies, "issued": len(issued), "workers": args.workers, "task": settings.issue.task,
              "batch": settings.issue.batch, "workers_killed": len(killed), "kill": killed,
              "duplicates": duplicates, "half_entries": half, "aliases_ok": aliases_ok, "error": error,
              "seconds_per_copy": wall / max(len(issued), 1), "wall_seconds": wall,
              "bytes_per_copy": (copy_bytes + artifact_bytes) / max(len(issued), 1),
              "bytes_per_copy_file": copy_bytes / max(len(issued), 1), "rows_returned": len(rows)}
    report(result, args.out, one_line=False)
    print(result)


if __name__ == "__main__":
    main()
