"""Name → factory registries for methods, tasks and encoders.

Each entry pairs a factory with the frozen dataclass that types its options, so a TOML table
can be validated against it before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generic, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Entry:
    name: str
    factory: Callable[..., Any]
    options: type | None
    doc: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Registry(Generic[F]):
    """A small named registry; ``kind`` is used in error messages ("unknown method 'x'")."""

    kind: str
    _entries: dict[str, Entry] = field(default_factory=dict)

    def register(self, name: str, options: type | None = None, *, replace: bool = False, **meta: Any) -> Callable[[F], F]:
        """Decorator registering ``factory`` under ``name``; ``meta`` holds flags such as
        ``needs_graph=True``."""

        def decorate(factory: F) -> F:
            if name in self._entries and not replace:
                raise ValueError(f"{self.kind} {name!r} is already registered (pass replace=True to override)")
            self._entries[name] = Entry(name, factory, options, (factory.__doc__ or "").strip(), dict(meta))
            return factory

        return decorate

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; available: {', '.join(sorted(self._entries))}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries


METHODS: Registry = Registry("method")
TASKS: Registry = Registry("task")
ENCODERS: Registry = Registry("encoder")


def register_task(name: str, options: type | None = None, *, replace: bool = False) -> Callable[[F], F]:
    """Register ``factory(options, *, seed: int) -> Task`` under ``name``; ``options`` is the
    frozen dataclass that types the config's ``[task]`` table (``None``: no options)."""
    return TASKS.register(name, options, replace=replace)


def available_tasks() -> list[str]:
    """Names of the registered tasks (built-in and user-registered), sorted."""
    return TASKS.names()
