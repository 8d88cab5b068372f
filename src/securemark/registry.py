"""One small registry class behind every kind of plug-in (code families, scorers,
decoders, attacks, transports, privacy attackers): register by name with a decorator,
look up by name with an error that lists the valid names, build with checked options."""

from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

from securemark.checks import constructor_options, known_options
from securemark.errors import UnknownName

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> plug-in. ``tag`` names the attribute set to the registered name on
    decorated classes (e.g. ``name`` or ``kind``); None leaves the object untouched."""

    def __init__(self, kind: str, tag: str | None = "name") -> None:
        self.kind = kind
        self.tag = tag
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")  # a programming error, at import
            self._items[name] = obj
            if self.tag is not None and isinstance(obj, type):
                setattr(obj, self.tag, name)
            return obj

        return decorator

    def get(self, name: str) -> T:
        """The plug-in registered as ``name``; :class:`UnknownName` listing the valid names otherwise."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise UnknownName(f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}") from None

    def create(self, name: str, **options: Any) -> Any:
        """Build the class registered as ``name`` with ``options`` (its constructor's
        keyword arguments); unknown options are refused with the accepted ones listed."""
        cls = self.get(name)
        known_options(f"{self.kind} {name!r}", options, constructor_options(cls))
        return cls(**options)

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
