"""One small registry class behind every kind of plug-in (code families, scorers,
decoders, attacks, transports): register by name with a decorator, look up by name
with an error that lists the valid names."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

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
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            if self.tag is not None and isinstance(obj, type):
                setattr(obj, self.tag, name)
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._items)
