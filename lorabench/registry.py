"""A small generic registry with lazy "module:attr" entries (fast start-up) and did-you-mean.

Pattern from lm-evaluation-harness: names are lower-case; an unknown name gets
`Unknown method 'dorra'. Did you mean: dora?` and the list of valid names.
A registry may declare `meta_keys`: every lazy entry then carries those facts at its call site
(a method's family, paper and title), so that `python -m lorabench list` answers without importing
any entry (importing them all means importing torch: seconds, more on a busy machine). A test
checks that each entry's facts equal its class's attributes.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Any, Generic, Iterator, TypeVar

from lorabench.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, meta_keys: tuple[str, ...] = ()):
        self.kind = kind  # "method", "task", ... used in messages
        self.meta_keys = meta_keys
        self._entries: dict[str, str | T] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register_lazy(self, name: str, target: str, **meta: Any) -> None:
        """Register `name` as "package.module:attr", imported on first use, with its `meta_keys` facts."""
        self._check_new(name)
        if ":" not in target:
            raise ValueError(f"lazy {self.kind} target must be 'module:attr', got {target!r}")
        if set(meta) != set(self.meta_keys):
            raise ValueError(f"{self.kind} {name!r}: register_lazy needs exactly the facts "
                             f"{', '.join(self.meta_keys) or '(none)'}, got {', '.join(sorted(meta)) or '(none)'}: "
                             f"copy them from the class's attributes of the same names (`list` shows them "
                             f"without importing it)")
        self._entries[name] = target
        self._meta[name] = meta

    def meta(self, name: str) -> dict[str, Any]:
        """The facts registered with `name` (`meta_keys`), without importing it."""
        if name not in self._entries:
            raise UserError(self.unknown_message(name))
        if name not in self._meta:  # registered eagerly: the object itself has them
            self._meta[name] = {k: getattr(self.get(name), k) for k in self.meta_keys}
        return self._meta[name]

    def register(self, name: str, obj: T) -> T:
        # Re-registering the same object (module re-import) is harmless; a different one is a bug.
        if name in self._entries and not isinstance(self._entries[name], str) and self._entries[name] is not obj:
            raise ValueError(f"{self.kind} {name!r} is already registered to {self._entries[name]!r}")
        if name not in self._entries:
            self._check_new(name)
        self._entries[name] = obj
        return obj

    def _check_new(self, name: str) -> None:
        if name != name.lower() or not name or " " in name:
            raise ValueError(f"{self.kind} names are lower-case without spaces, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise UserError(self.unknown_message(name))
        entry = self._entries[name]
        if isinstance(entry, str):
            module, attr = entry.split(":")
            entry = getattr(importlib.import_module(module), attr)
            self._entries[name] = entry
        return entry  # type: ignore[return-value]

    def unknown_message(self, name: str) -> str:
        msg = f"Unknown {self.kind} {name!r}."
        close = difflib.get_close_matches(str(name).lower(), self.names(), n=3, cutoff=0.6)
        if close:
            msg += f" Did you mean: {', '.join(close)}?"
        return msg + f" Valid {self.kind}s: {', '.join(self.names())}."

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def items(self) -> Iterator[tuple[str, Any]]:
        for n in self.names():
            yield n, self.get(n)
