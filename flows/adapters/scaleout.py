"""Where the per-customer fan-out runs: the flow's own thread, or a Dask cluster.

Issuing (one task per ``issue.task`` customers) and auditing (one task per attack family)
hand their tasks to :func:`results_in_order`. Without a cluster they run one after another
in the flow's thread (torch is slower in a worker thread of Prefect's pool). When ``SECUREMARK_DASK_ADDRESS`` (environment) or
``ops.dask_address`` (params) names a Dask scheduler (``tcp://host:8786``), the same
tasks run on that cluster through ``prefect-dask``. Dask workers must see the project
directory at the same path (one machine, or a shared file system) and the same
``PREFECT_API_URL``; tasks read their inputs from disk and return small results, and
everything that writes to MLflow stays in the flow's process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from prefect.task_runners import ThreadPoolTaskRunner

from flows.adapters.settings import OpsSettings
from securemark.errors import SecureMarkError

DASK_ADDRESS_ENV = "SECUREMARK_DASK_ADDRESS"


def dask_address(ops: OpsSettings) -> str | None:
    """The Dask scheduler to use, if any (the environment wins over params)."""
    address = os.environ.get(DASK_ADDRESS_ENV) or ops.dask_address
    return str(address) if address else None


def task_runner(ops: OpsSettings):
    """A fresh task runner for one flow run (runners are not shared between runs)."""
    address = dask_address(ops)
    if address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=address)
    return ThreadPoolTaskRunner(max_workers=ops.max_workers)


def results_in_order(task, calls: list[tuple[tuple, dict]], ops: OpsSettings) -> Iterator:
    """Each call's result (``task(*args, **kwargs)``), in the order of ``calls``.

    On a Dask cluster every call is submitted at once. Without one, each call runs in this
    (the flow's) thread when its result is asked for, one after another: torch ran 1.5-2x
    slower in a worker thread of Prefect's pool on this machine (issuing 2.4 vs 6.4 s per
    copy, the same copies), and tasks that each use every core gain nothing from running
    side by side."""
    if dask_address(ops):
        futures = [task.submit(*args, **kwargs) for args, kwargs in calls]
        return (future.result() for future in futures)
    return (task(*args, **kwargs) for args, kwargs in calls)


def retry_unless_invalid(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry a failed task (a lost worker, a busy file)
    unless it failed on invalid input or config (a SecureMarkError), which a retry
    cannot fix."""
    try:
        state.result()
    except SecureMarkError:
        return False
    except Exception:
        return True
    return True
