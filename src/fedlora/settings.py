"""Settings: a dataclass instance from a mapping, every value checked by its field's type annotation.

The one settings mechanism: the experiment config's sections (:mod:`fedlora.engine.config`), a
method's ``Settings`` (:mod:`fedlora.methods.registry`) and a task's ``Settings``
(:func:`fedlora.tasks.build_task`) are all built by :func:`parse`, and documented by :func:`describe`.

* An unknown key is refused, naming the key and the allowed ones.
* A value is checked, and coerced where that is lossless, by its field's annotation: ``bool``,
  ``int`` (not a bool), ``float`` (ints accepted; NaN and +-Inf refused, however given), ``str``,
  ``Literal[...]`` (a member, or a member's string form), ``X | None`` and other unions (members
  tried in order), ``list[X]`` (a list, or a comma-separated string), ``dict[K, V]`` (each entry
  checked under the key ``field.K``), a nested dataclass (a mapping, its keys dotted) and ``Any``.
* Text: a float field also takes a numeric string everywhere, because YAML 1.1 reads ``5e-4`` (no
  dot) as a string. ``text=True`` is for settings that may arrive as ``name=value`` text (a
  method's settings: ``fedlora aggregate --set tau=0.9``): an int is then also parsed from a string,
  a bool from the words true/false/yes/no/on/off/1/0 (and the ints 1/0, which is what YAML makes
  of ``--set compress=1``), ``None`` from none/null. Without it (the config, the tasks: values as
  YAML reads them) an int or bool field refuses a string.
* Field metadata ``min``/``max`` bound a number, or each number of a list or dict value; range
  checks that involve several fields stay with their owner (``__post_init__``, validators).
* Every refusal is a :class:`SettingsError` naming the owner (``fedmomentum``, ``math task``; none
  for the config) and the dotted key: ``train.lr=nan is not a finite number``.

It imports nothing from fedlora, so every layer can use it.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, TypeVar

T = TypeVar("T")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_NULL = frozenset({"none", "null"})
_PHRASES: dict[Any, str] = {
    bool: "a bool (true or false)",
    int: "an integer",
    float: "a float",
    str: "a string",
    type(None): "null",
    Any: "anything",
}
_PLURALS: dict[Any, str] = {bool: "bools", int: "integers", float: "floats", str: "strings"}


class SettingsError(ValueError):
    """A settings key that does not exist, or whose value is not allowed (the message names both)."""


class _Mismatch(Exception):
    """The value is not of the annotated type; the caller words the error, with the key."""


@dataclass(frozen=True)
class _Context:
    owner: str
    text: bool

    def error(self, message: str) -> SettingsError:
        return SettingsError(f"{self.owner}: {message}" if self.owner else message)


# ---- parsing -----------------------------------------------------------------------------------
def parse(cls: type[T], data: Mapping[str, Any], *, owner: str = "", text: bool = False) -> T:
    """``cls(**data)`` after checking every key and value (see the module docstring).

    ``owner`` starts every error message (``"fedmomentum"``, ``"math task"``); ``text`` also parses
    ints, bools and None from strings. Errors raised by ``cls`` itself (``__post_init__``) pass through.
    """
    return _dataclass(cls, data, "", _Context(owner, text))


def _dataclass(cls: type[T], data: Any, key: str, ctx: _Context) -> T:
    if not isinstance(data, Mapping):
        raise ctx.error(f"{key or 'settings'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        dotted = f"{key}.{name}" if key else str(name)
        if name not in fields:
            raise ctx.error(f"unknown key {dotted!r}; allowed: {', '.join(fields) or '(none)'}")
        kwargs[name] = _field(hints[name], value, dotted, fields[name].metadata, ctx)
    return cls(**kwargs)


def _field(ann: Any, value: Any, key: str, meta: Mapping[str, Any], ctx: _Context) -> Any:
    """``value`` checked against ``ann`` and the bounds in ``meta``; errors name ``key``."""
    try:
        out = _coerce(ann, value, key, ctx)
    except _Mismatch:
        if typing.get_origin(ann) is Literal:
            allowed = ", ".join(map(str, typing.get_args(ann)))
            raise ctx.error(f"{key}={value!r} is not allowed; choose one of {allowed}") from None
        raise ctx.error(f"{key} must be {_phrase(ann)}, got {value!r}") from None
    _check_bounds(out, meta, key, ctx)
    return out


def _coerce(ann: Any, value: Any, key: str, ctx: _Context) -> Any:
    if ann is Any:
        return value
    if dataclasses.is_dataclass(ann):
        if not isinstance(value, Mapping):
            raise _Mismatch
        return _dataclass(ann, value, key, ctx)  # type: ignore[arg-type]
    origin = typing.get_origin(ann)
    if origin is Literal:
        return _literal(typing.get_args(ann), value)
    if origin in (typing.Union, types.UnionType):
        return _union(typing.get_args(ann), value, key, ctx)
    if origin is list or ann is list:
        return _list(ann, value, key, ctx)
    if origin is dict or ann is dict:
        return _dict(ann, value, key, ctx)
    if ann is bool:
        return _bool(value, ctx)
    if ann is int:
        return _int(value, ctx)
    if ann is float:
        return _float(value, key, ctx)
    if ann is type(None):
        return _none(value, ctx)
    if isinstance(ann, type) and isinstance(value, ann):
        return value
    raise _Mismatch


def _literal(members: tuple[Any, ...], value: Any) -> Any:
    for m in members:
        if value == m and type(value) is type(m):
            return m
    if isinstance(value, str):
        for m in members:
            if str(m) == value:
                return m
    raise _Mismatch


def _union(members: tuple[Any, ...], value: Any, key: str, ctx: _Context) -> Any:
    for m in members:
        try:
            return _coerce(m, value, key, ctx)
        except _Mismatch:
            continue
    raise _Mismatch


def _list(ann: Any, value: Any, key: str, ctx: _Context) -> list[Any]:
    (item,) = typing.get_args(ann) or (Any,)
    if isinstance(value, str):  # "a,b,c": the items are text
        items, ctx = [v.strip() for v in value.split(",") if v.strip()], dataclasses.replace(ctx, text=True)
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise _Mismatch
    return [_coerce(item, v, key, ctx) for v in items]  # a wrong item: the whole list is wrong


def _dict(ann: Any, value: Any, key: str, ctx: _Context) -> dict[Any, Any]:
    if not isinstance(value, Mapping):
        raise _Mismatch
    key_t, val_t = typing.get_args(ann) or (Any, Any)
    return {(str(k) if key_t is str else k): _field(val_t, v, f"{key}.{k}", {}, ctx) for k, v in value.items()}


def _bool(value: Any, ctx: _Context) -> bool:
    if isinstance(value, bool):
        return value
    if ctx.text and isinstance(value, int) and value in (0, 1):
        return bool(value)
    if ctx.text and isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
    raise _Mismatch


def _int(value: Any, ctx: _Context) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if ctx.text and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise _Mismatch from None
    raise _Mismatch


def _float(value: Any, key: str, ctx: _Context) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _Mismatch
    try:
        number = float(value)
    except ValueError:
        raise _Mismatch from None
    except OverflowError:  # an int too large for a float
        number = math.inf
    if not math.isfinite(number):
        raise ctx.error(f"{key}={number!r} is not a finite number")
    return number


def _none(value: Any, ctx: _Context) -> None:
    if value is None or (ctx.text and isinstance(value, str) and value.strip().lower() in _NULL):
        return None
    raise _Mismatch


def _check_bounds(value: Any, meta: Mapping[str, Any], key: str, ctx: _Context) -> None:
    lo, hi = meta.get("min"), meta.get("max")
    if lo is None and hi is None:
        return
    if isinstance(value, Mapping):
        entries = [(f"{key}.{k}", v) for k, v in value.items()]
    elif isinstance(value, list):
        entries = [(key, v) for v in value]
    else:
        entries = [(key, value)]
    for where, v in entries:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if lo is not None and v < lo:
            raise ctx.error(f"{where}={v!r} is below the minimum {lo}")
        if hi is not None and v > hi:
            raise ctx.error(f"{where}={v!r} is above the maximum {hi}")


def _phrase(ann: Any) -> str:
    """What a value of ``ann`` is, in words (``"an integer or null"``)."""
    if ann in _PHRASES:
        return _PHRASES[ann]
    origin = typing.get_origin(ann)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(ann)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_phrase(m) for m in typing.get_args(ann))
    if origin is list or ann is list:
        (item,) = typing.get_args(ann) or (Any,)
        return f"a list of {_PLURALS.get(item, type_name(item) + ' items')}" if item is not Any else "a list"
    if origin is dict or ann is dict or dataclasses.is_dataclass(ann):
        return "a mapping"
    return type_name(ann)


# ---- describing ----------------------------------------------------------------------------------
class FieldDoc(NamedTuple):
    """One setting, for ``fedlora methods`` and ``docs/config.md``."""

    key: str  # dotted for nested dataclasses
    kind: str  # type_name of the annotation
    default: Any
    help: str  # the field's metadata["help"]

    def line(self) -> str:
        return f"{self.key} ({self.kind}, default {self.default!r}): {self.help}"


def type_name(ann: Any) -> str:
    """``a|b|c`` for a Literal, else the annotation's name (``float``, ``list``, ``int | None``)."""
    if typing.get_origin(ann) is Literal:
        return "|".join(map(str, typing.get_args(ann)))
    return getattr(ann, "__name__", str(ann))


def describe(cls: type, prefix: str = "") -> list[FieldDoc]:
    """Every field of the dataclass ``cls`` (nested dataclasses flattened to dotted keys)."""
    docs: list[FieldDoc] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        ann = hints[f.name]
        if dataclasses.is_dataclass(ann):
            docs.extend(describe(ann, f"{prefix}{f.name}."))  # type: ignore[arg-type]
            continue
        docs.append(FieldDoc(f"{prefix}{f.name}", type_name(ann), _default(f), f.metadata.get("help", "")))
    return docs


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


__all__ = ["FieldDoc", "SettingsError", "describe", "parse", "type_name"]
