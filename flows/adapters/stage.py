"""Entry for DVC stages and scripts: settings built once, errors a person can act on.

Exit codes of every entry point: 0 success, 2 invalid input or configuration (one line
on stderr, no traceback), 10 someone accused and 11 inconclusive (``securemark trace``), 1 anything else.
"""

from __future__ import annotations

import logging
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
