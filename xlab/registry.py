"""One registry type for every component kind (models, data sources, tokenizers, optimizers, ...).

A config group option names a component (`name: gpt`); the registry maps that name to the code that builds it,
so a reader goes from `configs/<group>/<option>.yaml` to the function in one hop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from xlab.errors import XLabError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of builders: `@REG.register("name")` adds one, `REG.get("name")` finds it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise XLabError(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
