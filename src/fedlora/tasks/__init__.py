"""Task plug-ins: each turns a data source into batches and metrics with a stated protocol."""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from fedlora.tasks.base import Example, Task, TaskData

# name -> "module:factory"; a factory takes (settings: Mapping, seed: int) and returns a Task.
TASKS: dict[str, str] = {
    "math": "fedlora.tasks.math.task:build",
    "code": "fedlora.tasks.code.task:build",
    "classification": "fedlora.tasks.classification:build",
    "commonsense": "fedlora.tasks.commonsense:build",
    "instruction": "fedlora.tasks.instruction:build",
    "shakespeare": "fedlora.tasks.shakespeare.task:build",
}


def build_task(name: str, settings: Mapping[str, Any] | None = None, *, seed: int = 0) -> Task:
    """The task ``name`` with ``settings`` (unknown settings raise ``ValueError`` naming them)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}")
    module, factory = TASKS[name].split(":")
    return getattr(importlib.import_module(module), factory)(dict(settings or {}), seed)


__all__ = ["TASKS", "Example", "Task", "TaskData", "build_task"]
