"""Logging for code that runs inside or outside a Prefect run, and an entry point's
terminal that shows one line, not a traceback, for errors SecureMark raises on purpose."""

from __future__ import annotations

import logging
import sys

from securemark.errors import SecureMarkError


def run_logger(fallback: str) -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task run, else the logger named ``fallback``
    (without importing Prefect when this process never did: no run can be active)."""
    if "prefect" not in sys.modules:
        return logging.getLogger(fallback)
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(fallback)


class _NoExpectedTracebacks(logging.Filter):
    """Drops log records that carry a SecureMarkError (invalid input or configuration):
    the entry point reports those itself, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, SecureMarkError) and "SecureMarkError" not in _exception_names(exc)


def _exception_names(exc: BaseException | None) -> str:
    names = []
    while exc is not None:
        names += [cls.__name__ for cls in type(exc).__mro__]
        exc = exc.__cause__ or exc.__context__
    return " ".join(names)


_QUIET = _NoExpectedTracebacks()


def quiet_expected_errors() -> None:
    """Keep Prefect from printing the traceback of a flow that failed on invalid input."""
    import prefect  # noqa: F401  (Prefect configures its handlers on import)

    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", ""):
        for handler in logging.getLogger(name).handlers:
            if _QUIET not in handler.filters:
                handler.addFilter(_QUIET)
