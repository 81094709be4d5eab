"""The method registry and method settings.

``@register`` adds a :class:`~fedlora.methods.base.Method` subclass to :data:`METHODS` (a
:class:`fedlora.registry.Registry`) under its ``name``; ``build_method("fedmomentum", {"tau": "0.99"})``
parses the settings with :func:`fedlora.settings.parse` in text mode (values may be strings, as
``fedlora aggregate --set tau=0.99`` passes them), so every error is a :class:`SettingsError`
naming the method and the key (and the allowed ones).
"""

from __future__ import annotations

from typing import Any, Mapping

from fedlora.methods.base import Method
from fedlora.registry import Registry
from fedlora.settings import SettingsError, describe, parse

METHODS: Registry[type[Method]] = Registry("method", error=SettingsError)
register = METHODS.register


def available_methods() -> list[str]:
    return METHODS.names()


def method_class(name: str) -> type[Method]:
    """The registered method ``name``; an unknown one raises :class:`SettingsError` listing them."""
    return METHODS.get(name)


def build_method(name: str, settings: Mapping[str, Any] | None = None) -> Method:
    """The registered method ``name`` with ``settings`` applied and validated."""
    cls = method_class(name)
    parsed = parse(cls.Settings, settings or {}, owner=name, text=True)
    try:
        return cls(parsed)
    except ValueError as exc:
        raise SettingsError(f"{name}: {exc}") from None


def describe_methods() -> str:
    """A human-readable list of methods and their settings (``fedlora methods``)."""
    lines = []
    for name in available_methods():
        cls = method_class(name)
        lines.append(f"{name}: {cls.summary}")
        lines.extend(f"    {doc.line()}" for doc in describe(cls.Settings))
    return "\n".join(lines)


__all__ = [
    "METHODS",
    "SettingsError",
    "available_methods",
    "build_method",
    "describe_methods",
    "method_class",
    "register",
]
