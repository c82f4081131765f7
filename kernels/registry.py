"""A registry of named classes open to third-party packages through an entry-point group.

One loader for every registry of the plugin: selectors (``vllm_sparse.selectors``) and policies
(``vllm_sparse.policies``). Built-ins register at import; an installed package's entry points are
read the first time a name is looked up that is not registered yet, or when the names are listed.
A leaf module: it imports nothing of the project.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries, each a subclass of ``base`` with a non-empty class attribute ``name``.

    Args:
        group: the entry-point group third-party packages register in.
        base: the class every entry subclasses.
        what: the word used in error messages (``"selector"``, ``"policy"``).
        setting: the configuration key the name comes from (named in the error for a bad name).
        make: turns a registered class into the stored entry (e.g. an instance); the class itself
            by default.
        check: further checks on a class before it is registered (raise ``TypeError``).
    """

    def __init__(self, group: str, base: type, what: str, setting: str,
                 make: Callable[[type], T] | None = None, check: Callable[[type], None] | None = None):
        self.group, self.base, self.what, self.setting = group, base, what, setting
        self._make = make or (lambda cls: cls)
        self._check = check
        self._entries: dict[str, T] = {}
        self._entry_points_loaded = False

    def register(self, cls: type) -> type:
        """Register ``cls`` under ``cls.name`` (usable as a decorator)."""
        if not (isinstance(cls, type) and issubclass(cls, self.base)) or not getattr(cls, "name", ""):
            raise TypeError(f"{cls!r} must be a {self.base.__module__}.{self.base.__qualname__} subclass "
                            f"with a non-empty `name`")
        if self._check is not None:
            self._check(cls)
        self._entries[cls.name] = self._make(cls)
        return cls

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a no-op when absent): tests that register classes for a while."""
        self._entries.pop(name, None)

    def load_entry_points(self, reload: bool = False) -> None:
        """Register the classes installed packages name in :attr:`group` (once, or again with ``reload``)."""
        if self._entry_points_loaded and not reload:
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=self.group):
            cls = ep.load()
            if getattr(cls, "name", None) != ep.name:
                raise ValueError(f"entry point {ep.name!r} ({ep.value}) loads a {self.what} named "
                                 f"{getattr(cls, 'name', None)!r}; the names must match")
            self.register(cls)

    def names(self) -> list[str]:
        """Every registered name: built-in and installed third-party."""
        self.load_entry_points()
        return sorted(self._entries)

    def get(self, name: str) -> T:
        """The entry called ``name``; ``ValueError`` naming the setting and the allowed names otherwise."""
        if name not in self._entries:
            self.load_entry_points()
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ValueError(f"vllm_sparse {self.setting}={name!r}; allowed: {self.names()}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._entries
