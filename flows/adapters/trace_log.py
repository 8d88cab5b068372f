"""Trace records in MLflow: logged at once, or queued and logged by a background process.

Every trace becomes one MLflow run (experiment ``securemark-trace``: params, metrics, the
report as JSON and markdown, the score plot). Inside a stage or a Prefect flow the run is
written at once (:func:`log_record`). The ``securemark trace`` command answers first and
leaves the MLflow run to a detached process: importing MLflow and opening its store cost
more than the trace itself. Nothing is lost on the way:

1. the record is written to the outbox (``.securemark-outbox/`` in the project,
   git-ignored, owner-only) atomically, before the command prints its verdict;
2. a detached ``python -m flows.adapters.trace_log`` claims each queued record (an atomic
   rename), logs it and removes it; a record it could not log goes back to the queue;
3. any later drain (the next command's, or ``python -m flows.adapters.trace_log`` by hand)
   logs whatever is still queued, including records of a drainer that died.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from flows.adapters.paths import Paths
from securemark.private_files import private_dir, write_private

log = logging.getLogger(__name__)

__all__ = ["drain", "log_record", "queue", "record", "spawn_drain"]


def record(report: dict, verdict, indices, cfg, key_id: str, tags: dict[str, str]) -> dict:
    """One trace as plain JSON data: what :func:`log_record` writes to MLflow."""
    return {
        "report": report,
        "tags": tags,
        "params": {"model": report["model"][:250], "epsilon": cfg.epsilon, "scorer": cfg.scorer, "key_id": key_id,
                   "channel": report.get("channel", "weights")},
        "metrics": {"accused": len(report["accused"]), "threshold": min(verdict.threshold, 1e300), "max_score": float(verdict.scores.max()),
                    "queries": float(report.get("queries") or 0)},
        "plot": {"indices": [int(i) for i in indices], "scores": [float(s) for s in verdict.scores], "threshold": float(verdict.threshold),
                 "epsilon": verdict.epsilon, "scorer": verdict.scorer, "accused": [c.codeword_index for c in verdict.accused]},
    }


def log_record(paths: Paths, entry: dict) -> tuple[str, str]:
    """Write ``entry`` (:func:`record`) as an MLflow run; returns its id and browser link."""
    import mlflow

    from flows.adapters import artifacts, reports, tracking
    from flows.adapters.tracking import TRACE_EXPERIMENT

    report = entry["report"]
    with tracking.run("trace", TRACE_EXPERIMENT, paths, tags=entry["tags"]) as run:
        mlflow.log_params(entry["params"])
        mlflow.log_metrics(entry["metrics"])
        mlflow.log_dict(report, "trace_report.json")
        mlflow.log_text(reports.trace_markdown(report), "trace_report.md")
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.log_artifact(str(reports.score_plot_of(entry["plot"], Path(tmp) / "scores.png")))
        return run.info.run_id, artifacts.mlflow_run_url(run.info.run_id, run.info.experiment_id)


def queue(paths: Paths, entry: dict) -> Path:
    """Put ``entry`` in the outbox (atomically, owner-only); returns its file."""
    path = paths.trace_outbox / f"{time.time_ns()}-{uuid.uuid4().hex[:8]}.json"
    write_private(path, lambda handle: handle.write(json.dumps(entry).encode()))
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def drain(paths: Paths) -> int:
    """Log every queued record to MLflow; returns how many were logged. A record is claimed
    by renaming it (so two drainers never log it twice), removed once logged, and put back
    in the queue when logging fails (or when the drainer that claimed it has died)."""
    outbox = paths.trace_outbox
    if not outbox.is_dir():
        return 0
    for claimed in outbox.glob("*.claimed-*"):  # a drainer died mid-record: queue it again
        if not _alive(int(claimed.name.rsplit("-", 1)[1])):
            claimed.rename(claimed.with_name(claimed.name.split(".claimed-")[0]))
    logged = 0
    for queued in sorted(outbox.glob("*.json")):
        claimed = queued.with_name(f"{queued.name}.claimed-{os.getpid()}")
        try:
            queued.rename(claimed)
        except FileNotFoundError:  # another drainer took it
            continue
        try:
            log_record(paths, json.loads(claimed.read_text()))
        except Exception as exc:  # the store is locked or down: keep the record for the next drain
            claimed.rename(queued)
            log.warning("could not log the queued trace %s to MLflow (%s); it stays queued", queued.name, exc)
            continue
        claimed.unlink()
        logged += 1
    return logged


def spawn_drain(paths: Paths) -> None:
    """Start a detached process that drains the outbox (it outlives this one; its errors
    go to ``.securemark-outbox/drain.log``)."""
    outbox = private_dir(paths.trace_outbox)
    fd = os.open(outbox / "drain.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "ab") as errors:
        subprocess.Popen([sys.executable, "-m", "flows.adapters.trace_log"], cwd=paths.root, env={**os.environ, "SECUREMARK_ROOT": str(paths.root)},
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors, start_new_session=True)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    drain(Paths.from_env())


if __name__ == "__main__":
    main()
