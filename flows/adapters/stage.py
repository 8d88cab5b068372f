"""Entry for DVC stages and scripts: settings built once, errors a person can act on.

Exit codes of every entry point: 0 success, 2 invalid input or configuration (one line
on stderr, no traceback), 10 someone accused and 11 inconclusive (``securemark trace``), 1 anything else.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from typing import Any, Callable

from flows.adapters.logs import quiet_expected_errors
from flows.adapters.paths import Paths
from flows.adapters.settings import Settings
from securemark.errors import SecureMarkError

EXIT_INVALID = 2


def exit_invalid(exc: SecureMarkError | str) -> None:
    """The one way an entry point ends on a project error: one line on stderr, exit 2."""
    sys.stderr.write(f"securemark: {exc}\n")
    sys.exit(EXIT_INVALID)


def stage_main(body: Callable[[Paths, Settings], Any]) -> None:
    """Build the settings from the project's ``params.yaml`` and run ``body(paths, settings)``.

    A :class:`SecureMarkError` (bad params, missing dataset, failed validation, invalid
    input) ends the process with its message and exit code 2.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_expected_errors()
    paths = Paths.from_env()
    try:
        body(paths, Settings.load(paths.params))
    except SecureMarkError as exc:
        exit_invalid(exc)
    if _run_as_command():
        end_process(0)


def _run_as_command() -> bool:
    """Whether this process is a stage command (``python -m flows.<stage>``), not a caller
    that imported the stage (a test, a script)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec is not None and spec.name.startswith("flows.")


def end_process(code: int) -> None:
    """End a finished command (a stage, a plain ``securemark trace``) without the
    interpreter's teardown of its modules (1.5-2.5 s here for a process that imported
    torch, MLflow and Prefect; a DVC stage pays it once per stage). What teardown would
    do that matters is done first: the exit handlers run (Prefect drains its log and
    event workers, MLflow ends its runs and flushes its queues, a temporary Prefect
    server stops), then the log handlers and the standard streams are flushed. Threads are not joined: the work is done when the body returns,
    and idle pool workers wait for a shutdown call only the interpreter's teardown makes
    (joining them without it never returns)."""
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
