"""Task plug-ins: each turns a data source into batches and metrics with a stated protocol.

Importing this package imports every task module, which registers its task class in
:data:`~fedlora.tasks.base.TASKS` (``@register``, like the methods); :func:`build_task` parses a
task's settings into its ``Settings`` dataclass with :func:`fedlora.settings.parse`.
"""

from __future__ import annotations

from typing import Any, Mapping

from fedlora.settings import parse
from fedlora.tasks import (  # noqa: F401  (importing registers each task)
    classification,
    code,
    commonsense,
    instruction,
    math,
    shakespeare,
)
from fedlora.tasks.base import TASKS, Example, Task, TaskData


def build_task(name: str, settings: Mapping[str, Any] | None = None, *, seed: int = 0) -> Task:
    """The task ``name`` with ``settings``: unknown names, unknown settings and mistyped values raise
    :class:`~fedlora.settings.SettingsError` naming them; the ``Settings`` class's own checks raise theirs."""
    cls = TASKS.get(name)
    return cls(parse(cls.Settings, settings or {}, owner=f"{name} task"), seed=seed)


__all__ = ["TASKS", "Example", "Task", "TaskData", "build_task"]
