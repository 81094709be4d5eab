"""The task contract the runtimes use: data, batches with loss masks, evaluation.

A task turns examples (plain dicts) into training batches whose ``labels`` mask the prompt
(``-100``) so the loss is on the completion only, and evaluates a model on held-out examples
with a stated protocol (written into every run's results).

A task is a class with a ``name``, a ``kind`` and a ``Settings`` dataclass (its ``task.settings``),
constructed as ``cls(settings, seed=seed)`` and registered with ``@register`` in :data:`TASKS`
(a :class:`fedlora.registry.Registry`); :func:`fedlora.tasks.build_task` parses the settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from fedlora.registry import Registry
from fedlora.settings import SettingsError

Example = dict[str, Any]


@dataclass
class TaskData:
    """Train and test examples, split before any client partition. ``group_key`` names the
    example field used for non-IID partitions (a category or label)."""

    train: list[Example]
    test: list[Example]
    group_key: str = "category"
    info: dict[str, Any] = field(default_factory=dict)


class Task(Protocol):
    name: str
    kind: str  # "causal_lm" or "seq_cls"
    Settings: ClassVar[type]  # a dataclass: the task's settings (``task.settings`` of a run's config)

    def load(self) -> TaskData:
        """Train/test examples (deterministic for the task's settings and seed)."""
        ...

    def collate(self, examples: list[Example], tokenizer: Any) -> dict[str, torch.Tensor]:
        """A padded training batch: ``input_ids``, ``attention_mask``, ``labels`` (prompt = -100)."""
        ...

    def evaluate(self, model: Any, tokenizer: Any, examples: list[Example]) -> dict[str, float]:
        """Metrics of ``model`` on ``examples`` (e.g. ``{"exact_match": 0.31}``)."""
        ...

    def protocol(self) -> dict[str, Any]:
        """How evaluation is done (decoding, extraction, metric), for the run's records."""
        ...


TASKS: Registry[type] = Registry("task", error=SettingsError)
register = TASKS.register
