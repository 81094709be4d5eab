"""Registries of named plug-in classes: the one registration style of methods and tasks.

``METHODS = Registry("method")``; ``@METHODS.register`` on a class adds it under its ``name``
attribute (lowercase, unique); ``METHODS.get("fedit")`` returns the class, or raises an error
that lists the available names; ``METHODS.names()`` is sorted. A plug-in declares its ``name``
and a ``Settings`` dataclass; building one from a mapping is :func:`fedlora.settings.parse`.

Loading is eager: a class is registered when its module is imported, and the package that owns
a registry (:mod:`fedlora.methods`, :mod:`fedlora.tasks`) imports all of its plug-in modules.
Measured: the six task modules add about 0.12 s (7%) to the 1.5 s that ``import fedlora.tasks`` (torch)
takes anyway, too little to justify a second, lazy (name -> module path) look-up.

It imports nothing from fedlora, so every layer can use it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

C = TypeVar("C", bound=type)


class Registry(Generic[C]):
    """Classes of one kind (``"method"``, ``"task"``) by their ``name`` attribute."""

    def __init__(self, kind: str, *, error: Callable[[str], Exception] = ValueError) -> None:
        """``error`` is the exception an unknown name raises (e.g. the owner's settings error)."""
        self.kind = kind
        self._error = error
        self._classes: dict[str, C] = {}

    def register(self, cls: C) -> C:
        """Class decorator: add ``cls`` under ``cls.name``; a bad or taken name raises ``ValueError``."""
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name or name != name.lower() or name in self._classes:
            raise ValueError(f"{self.kind} name {name!r} must be lowercase and unique")
        self._classes[name] = cls
        return cls

    def get(self, name: str) -> C:
        """The class registered as ``name``; an unknown name raises ``error`` listing the known ones."""
        try:
            return self._classes[name]
        except KeyError:
            raise self._error(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._classes)

    def __contains__(self, name: object) -> bool:
        return name in self._classes
