"""Validators shared by every plug-in and config: one place, one error type.

Each takes the *owner* of the value (``"attack 'prune'"``, ``"code family 'tardos'"``,
``"trace"``), the key and the value, and returns the value converted, or raises
:class:`~securemark.errors.InvalidConfig` with a message that names all three. Entry
points turn that error into exit code 2 with one line; task runners never retry it.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Iterable

import numpy as np

from securemark.errors import InvalidConfig

__all__ = ["number", "integer", "choice", "known_options", "constructor_options"]


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def number(owner: str, key: str, value: Any, low: float = -math.inf, high: float = math.inf, *,
           low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite float in the interval (``low_open``/``high_open`` exclude the ends)."""
    ok = _is_real(value) and math.isfinite(float(value))
    if ok:
        v = float(value)
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise InvalidConfig(f"{owner}: {key} must be a number in {interval}, got {value!r}")
    return float(value)


def integer(owner: str, key: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int within ``[low, high]`` (either end may be open-ended with None)."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        if high is None:
            bound = "" if low is None else f" >= {low}"
        else:
            bound = f" in [{low}, {high}]"
        raise InvalidConfig(f"{owner}: {key} must be an integer{bound}, got {value!r}")
    return int(value)


def choice(owner: str, key: str, value: Any, options: Iterable[str]) -> str:
    options = list(options)
    if value not in options:
        raise InvalidConfig(f"{owner}: {key} must be one of {options}, got {value!r}")
    return str(value)


def known_options(owner: str, given: Iterable[str], accepted: Iterable[str]) -> None:
    """Refuse option names that the plug-in does not take (typos in params)."""
    accepted = sorted(accepted)
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise InvalidConfig(f"{owner}: unknown option(s) {unknown}; accepted: {accepted}")


def constructor_options(cls: type) -> list[str]:
    """The keyword arguments ``cls(...)`` accepts (dataclass fields or ``__init__`` parameters)."""
    fields = getattr(cls, "__dataclass_fields__", None)
    if fields is not None:
        return [name for name, f in fields.items() if f.init]
    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
