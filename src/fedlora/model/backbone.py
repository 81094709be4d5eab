"""Applying factored backbone deltas to the weights of a live model, in place.

Modules are named by their PEFT key prefix (``base_model.model.<path>``). On a ``PeftModel``
the LoRA layer's frozen ``base_layer.weight`` is updated; on a plain transformers model the
prefix is stripped and ``<path>.weight`` is updated. ``fan_in_fan_out`` (GPT-2 Conv1D) is read
from the LoRA layer where there is one.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from fedlora.lowrank import FactoredDelta

PEFT_PREFIX = "base_model.model."


def target_weight(model: nn.Module, module: str) -> tuple[torch.Tensor, bool]:
    """The dense weight a delta for ``module`` applies to, and whether it is stored transposed."""
    try:
        layer = model.get_submodule(module)
    except AttributeError:
        if not module.startswith(PEFT_PREFIX):
            raise
        try:
            layer = model.get_submodule(module[len(PEFT_PREFIX) :])
        except AttributeError:
            raise KeyError(f"module {module} is not in the model") from None
    fan_in_fan_out = bool(getattr(layer, "fan_in_fan_out", False))
    base = getattr(layer, "base_layer", layer)
    weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise KeyError(f"module {module} has no weight")
    if type(base).__name__ == "Conv1D":
        fan_in_fan_out = True
    return weight, fan_in_fan_out


@torch.no_grad()
def apply_backbone_delta(model: nn.Module, deltas: Mapping[str, FactoredDelta], alpha: float = 1.0) -> None:
    """``W += alpha * delta`` for every module (float32 accumulation, stored in the weight's dtype).

    All targets are resolved before any weight changes, so a missing module changes nothing.
    """
    targets = {m: target_weight(model, m) for m, d in deltas.items() if not d.is_empty}
    for m, (weight, fan) in targets.items():
        deltas[m].apply_to(weight.data, fan_in_fan_out=fan, alpha=alpha)
