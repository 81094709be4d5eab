"""Applying factored backbone deltas to a live model: merged into the weights, or beside them.

Modules are named by their PEFT key prefix (``base_model.model.<path>``). On a ``PeftModel``
the LoRA layer's frozen base layer is the target; on a plain transformers model the prefix is
stripped. ``fan_in_fan_out`` (GPT-2 Conv1D) is read from the LoRA layer where there is one.

Two modes (``model.backbone_delta``):

* ``merge``: ``W += delta`` in place, accumulated in float32 and stored in the weight's dtype:
  exact for float32 weights, lossy for bf16/fp16 ones (most of a small delta rounds away),
  impossible for bitsandbytes 4-bit/8-bit weights (refused by name);
* ``side``: the delta joins the layer's float32 side path (:mod:`fedlora.model.side`), exact on
  any base.

``auto`` is ``merge`` when every weight a delta targets is float32 (or float64), ``side`` otherwise.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

from fedlora.lowrank import FactoredDelta
from fedlora.model import side as side_path

PEFT_PREFIX = "base_model.model."
MODES = ("auto", "merge", "side")
QUANTIZED_PARAMS = ("Params4bit", "Int8Params")


def target_layer(model: nn.Module, module: str) -> tuple[nn.Module, bool]:
    """The base layer a delta for ``module`` applies to, and whether its weight is stored transposed."""
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
    if not isinstance(getattr(base, "weight", None), torch.Tensor):
        raise KeyError(f"module {module} has no weight")
    if type(base).__name__ == "Conv1D":
        fan_in_fan_out = True
    return base, fan_in_fan_out


def target_weight(model: nn.Module, module: str) -> tuple[torch.Tensor, bool]:
    """The stored weight a delta for ``module`` applies to, and whether it is stored transposed."""
    base, fan_in_fan_out = target_layer(model, module)
    return base.weight, fan_in_fan_out


def is_quantized(weight: torch.Tensor) -> bool:
    """A bitsandbytes 4-bit (packed uint8) or 8-bit (int8 + scales) weight."""
    return type(weight).__name__ in QUANTIZED_PARAMS or not weight.is_floating_point()


def is_cpu_repacked(weight: torch.Tensor) -> bool:
    """A 4-bit weight bitsandbytes repacked for its fused CPU kernel (see
    :func:`fedlora.model.quantization.keep_4bit_layout`): no autograd, no dequantizing."""
    return bool(getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False))


def mergeable(weight: torch.Tensor) -> bool:
    """Whether ``W += delta`` in place is exact up to float32 rounding (float32/float64 weights)."""
    return not is_quantized(weight) and weight.dtype in (torch.float32, torch.float64)


def resolve_mode(mode: str, model: nn.Module, modules: Iterable[str]) -> str:
    """``merge`` or ``side`` for ``mode`` (``auto``: merge iff every target weight is float32/64)."""
    if mode not in MODES:
        raise ValueError(f"model.backbone_delta={mode!r}: choose one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    return "merge" if all(mergeable(target_weight(model, m)[0]) for m in modules) else "side"


@torch.no_grad()
def dense_weight(model: nn.Module, module: str) -> torch.Tensor:
    """The weight the base layer of ``module`` computes with, dequantized, float32, ``nn.Linear``
    orientation, on the CPU (a copy; for tests and checks on small layers)."""
    from peft.utils.integrations import dequantize_module_weight

    base, fan = target_layer(model, module)
    if is_cpu_repacked(base.weight):
        raise ValueError(f"{module}: its 4-bit weight was repacked for bitsandbytes' CPU kernel (see keep_4bit_layout)")
    w = dequantize_module_weight(base) if is_quantized(base.weight) else base.weight
    w = w.detach().float().cpu().clone()
    return w.T if fan else w


def layer_shape(base: nn.Module, fan_in_fan_out: bool) -> tuple[int, int]:
    """``(d_out, d_in)`` of a base layer (packed quantized weights included)."""
    if hasattr(base, "out_features") and hasattr(base, "in_features"):
        return int(base.out_features), int(base.in_features)
    shape = tuple(base.weight.shape)
    return (shape[1], shape[0]) if fan_in_fan_out else (shape[0], shape[1])


@torch.no_grad()
def apply_backbone_delta(
    model: nn.Module,
    deltas: Mapping[str, FactoredDelta],
    alpha: float = 1.0,
    *,
    mode: str = "merge",
    rtol: float = 0.0,
    max_rank: int = 0,
) -> dict[str, float]:
    """``W += alpha * delta`` for every module, merged (float32 accumulation, stored in the weight's
    dtype) or on the side path (``mode``, see the module docstring; ``rtol``/``max_rank`` bound
    the side path's rank). Returns, per module on the side path, the fraction of its accumulated
    energy a cap dropped.

    All targets are resolved and checked before anything changes, so a missing module or a
    quantized weight under ``merge`` changes nothing.
    """
    live = [m for m, d in deltas.items() if not d.is_empty]
    mode = resolve_mode(mode, model, live)
    targets = {m: target_layer(model, m) for m in live}
    dropped: dict[str, float] = {}
    if mode == "merge":
        for m, (base, _) in targets.items():
            if is_quantized(base.weight):
                raise ValueError(
                    f"model.backbone_delta=merge: {m} has a quantized weight ({type(base).__name__}), which "
                    "cannot be added to; use side (or auto)"
                )
        for m, (base, fan) in targets.items():
            deltas[m].apply_to(base.weight.data, fan_in_fan_out=fan, alpha=alpha)
        return dropped
    for m, (base, fan) in targets.items():
        d_out, d_in = layer_shape(base, fan)
        if (deltas[m].d_out, deltas[m].d_in) != (d_out, d_in):
            raise ValueError(f"delta {deltas[m].d_out}x{deltas[m].d_in} does not fit {m} ({d_out}x{d_in})")
    for m, (base, fan) in targets.items():
        side = side_path.attach(base, *layer_shape(base, fan), rtol=rtol, max_rank=max_rank)
        dropped[m] = side.add(deltas[m], side_path.module_device(base), alpha)
    return dropped
