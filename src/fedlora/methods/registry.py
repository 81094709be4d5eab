"""The method registry and ``name=value`` settings parsing.

``@register`` adds a :class:`~fedlora.methods.base.Method` subclass under its ``name``;
``build_method("fedmomentum", {"tau": "0.99"})`` parses string values by each setting's type
and names the offending key (and the allowed ones) on any error.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping

from fedlora.methods.base import Method

_REGISTRY: dict[str, type[Method]] = {}


class SettingsError(ValueError):
    """A setting that does not exist or whose value is not allowed."""


def register(cls: type[Method]) -> type[Method]:
    name = cls.name
    if not name or name != name.lower() or name in _REGISTRY:
        raise ValueError(f"method name {name!r} must be lowercase and unique")
    _REGISTRY[name] = cls
    return cls


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise SettingsError(f"unknown method {name!r}; available: {', '.join(available_methods())}") from None


def setting_fields(cls: type[Method]) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls.Settings))


def _coerce(method: str, key: str, value: Any, annotation: Any) -> Any:
    hints = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else None
    if hints is not None:
        allowed = [str(h) for h in hints]
        if str(value) not in allowed:
            raise SettingsError(f"{method}: setting {key}={value!r} is not allowed; choose one of {', '.join(allowed)}")
        return hints[allowed.index(str(value))]
    if not isinstance(value, str):
        if annotation is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value
    try:
        if annotation is bool:
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if annotation is int:
            return int(value)
        if annotation is float:
            return float(value)
    except ValueError:
        raise SettingsError(f"{method}: setting {key}={value!r} is not a valid {annotation.__name__}") from None
    return value


def parse_settings(cls: type[Method], values: Mapping[str, Any]) -> Any:
    """Build ``cls.Settings`` from ``values`` (strings are parsed by field type)."""
    fields = {f.name: f for f in setting_fields(cls)}
    hints = typing.get_type_hints(cls.Settings)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            allowed = ", ".join(fields) or "(none)"
            raise SettingsError(f"{cls.name}: unknown setting {key!r}; allowed: {allowed}")
        kwargs[key] = _coerce(cls.name, key, value, hints[key])
    return cls.Settings(**kwargs)


def build_method(name: str, settings: Mapping[str, Any] | None = None) -> Method:
    """The registered method ``name`` with ``settings`` applied and validated."""
    cls = method_class(name)
    parsed = parse_settings(cls, settings or {})
    try:
        return cls(parsed)
    except ValueError as exc:
        raise SettingsError(f"{name}: {exc}") from None


def describe_methods() -> str:
    """A human-readable list of methods and their settings (``fedlora methods``)."""
    lines = []
    for name in available_methods():
        cls = _REGISTRY[name]
        lines.append(f"{name}: {cls.summary}")
        hints = typing.get_type_hints(cls.Settings)
        for f in setting_fields(cls):
            ann = hints[f.name]
            kind = (
                "|".join(map(str, typing.get_args(ann))) if typing.get_origin(ann) is typing.Literal else ann.__name__
            )
            help_text = f.metadata.get("help", "")
            lines.append(f"    {f.name} ({kind}, default {f.default!r}): {help_text}")
    return "\n".join(lines)
