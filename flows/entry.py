"""Command-line entry for DVC stages: errors a person can act on, without a traceback."""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable

from flows.project import Paths, load_params
from securemark.errors import SecureMarkError

EXIT_INVALID = 2


def stage_main(body: Callable[[Paths, dict[str, Any]], Any]) -> None:
    """Load params from the project root and run ``body(paths, params)``.

    A :class:`SecureMarkError` (bad params, missing dataset, failed validation) ends
    the process with its message and exit code 2.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    paths = Paths.from_env()
    try:
        body(paths, load_params(paths.params))
    except SecureMarkError as exc:
        sys.stderr.write(f"securemark: {exc}\n")
        sys.exit(EXIT_INVALID)
