"""Name → object registries filled by plugin hooks, with clear errors for clashes and misses."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from builder.errors import PluginError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """A dict that remembers which plugin registered each name."""

    def __init__(self, kind: str, names_of: Callable[[T], Iterable[str]]) -> None:
        self.kind = kind
        self._names_of = names_of
        self._items: dict[str, T] = {}
        self._owners: dict[str, str] = {}

    def register(self, item: T, *, replace: bool = False, owner: str = "?") -> None:
        for name in self._names_of(item):
            if name in self._items and not replace:
                raise PluginError(f"{self.kind} {name!r} registered by both "
                                  f"{self._owners[name]} and {owner}; pass replace=True to "
                                  "override on purpose")
            self._items[name] = item
            self._owners[name] = owner

    def get(self, name: str) -> T | None:
        return self._items.get(name)

    def owner(self, name: str) -> str:
        return self._owners[name]

    def values(self) -> list[T]:
        return [self._items[name] for name in self.names()]

    def names(self) -> list[str]:
        return sorted(self._items)

    def suggest(self, name: str) -> str:
        return did_you_mean(name, self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
