"""Quantized base models (``model.quantization``): bitsandbytes 4-bit (NF4, FP4) and 8-bit weights.

The base is loaded through transformers' ``BitsAndBytesConfig``, the QLoRA recipe:

* ``nf4`` / ``fp4``: 4-bit weights with double quantization of the block scales, matmuls in the
  compute dtype ``model.dtype`` (bfloat16 on GPUs; float32 works too);
* ``int8``: LLM.int8() weights (int8 with per-row scales, outlier columns in fp16);
* then PEFT's ``prepare_model_for_kbit_training`` (the non-quantized parameters, norms and
  embeddings, in float32; gradient checkpointing is ``train.gradient_checkpointing``'s, not its).

Only the LoRA factors train; the quantized weights are never written to. Backbone deltas of
merging methods go to the float32 side path (:mod:`fedlora.model.side`; ``model.backbone_delta``
``auto`` picks it), and an exported model merges onto the original full-precision base, never
onto the quantized one.

:func:`check_quantization` runs one tiny quantized layer on the target device before any model
loads, so a platform without the kernel (no bitsandbytes, a device bitsandbytes cannot run on)
fails at once with the key, the reason and what does run there.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from fedlora.model.backbone import is_cpu_repacked

QUANTIZATIONS = ("none", "nf4", "fp4", "int8")


def bnb_config(quantization: str, compute_dtype: torch.dtype) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``quantization`` (``None`` for ``none``)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"model.quantization={quantization!r}: choose one of {', '.join(QUANTIZATIONS)}")
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def _probe(quantization: str, device: torch.device, compute_dtype: torch.dtype) -> None:
    import bitsandbytes as bnb

    if quantization == "int8":
        layer = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False)
        x = torch.randn(2, 64, dtype=torch.float16 if device.type == "cuda" else torch.float32)
    else:
        layer = bnb.nn.Linear4bit(
            64, 32, bias=False, compute_dtype=compute_dtype, quant_type=quantization, compress_statistics=True
        )
        x = torch.randn(2, 64, dtype=compute_dtype)
    layer = layer.to(device)
    y = layer(x.to(device))
    if not bool(torch.isfinite(y).all()):
        raise RuntimeError("the probe layer's output is not finite")


def runnable(device: torch.device, compute_dtype: torch.dtype = torch.float32) -> dict[str, str | None]:
    """Per quantization, ``None`` if it runs on ``device``, else why not."""
    out: dict[str, str | None] = {"none": None}
    if importlib.util.find_spec("bitsandbytes") is None:
        missing = "bitsandbytes is not installed (pip install 'fedlora[quant]')"
        return {**out, **dict.fromkeys(QUANTIZATIONS[1:], missing)}
    for q in QUANTIZATIONS[1:]:
        try:
            _probe(q, device, compute_dtype)
            out[q] = None
        except Exception as exc:  # any failure of the kernel is the answer
            out[q] = f"{type(exc).__name__}: {exc}".strip()[:300]
    return out


def check_quantization(quantization: str, device: torch.device, compute_dtype: torch.dtype) -> None:
    """Raise ``ValueError`` naming ``model.quantization`` if it cannot run on ``device``."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"model.quantization={quantization!r}: choose one of {', '.join(QUANTIZATIONS)}")
    if quantization == "none":
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(
            f"model.quantization={quantization} needs bitsandbytes, which is not installed "
            "(pip install 'fedlora[quant]'); available here: none"
        )
    try:
        _probe(quantization, device, compute_dtype)
    except Exception as exc:
        able = [q for q, why in runnable(device, compute_dtype).items() if why is None]
        raise ValueError(
            f"model.quantization={quantization} cannot run on {device} with this bitsandbytes "
            f"({type(exc).__name__}: {exc}); available here: {', '.join(able)}"
        ) from None


def prepare_quantized(model: Any) -> Any:
    """PEFT's k-bit preparation (float32 norms and embeddings, input gradients), without
    turning on gradient checkpointing (``train.gradient_checkpointing`` decides that), and 4-bit
    layers kept in their trainable layout (:func:`keep_4bit_layout`)."""
    from peft import prepare_model_for_kbit_training

    return keep_4bit_layout(prepare_model_for_kbit_training(model, use_gradient_checkpointing=False))


def keep_4bit_layout(model: Any) -> Any:
    """Turn off bitsandbytes' CPU repacking of 4-bit weights, on every ``Linear4bit`` of ``model``.

    bitsandbytes 0.50 repacks a 4-bit weight, in place, into an AVX512-BF16 layout the first time
    its layer runs in eval mode on a CPU that has the instructions (``support_avx512bf16_for_cpu``).
    From then on the layer computes through a kernel with no autograd (the gradient stops at the
    layer: the LoRA factors below it get none through it) and its weight no longer dequantizes
    with its quant state (the side path and the backbone checks read garbage). fedlora evaluates
    between rounds and trains after, on the same model, so the repacking is turned off: the
    layer keeps the standard layout and bitsandbytes' autograd matmul in both modes (CPU inference
    loses the fused kernel; GPUs are not affected). Call it before the model's first forward: the
    repacking's inverse does not restore the block scales exactly, so a repacked weight is refused."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            if is_cpu_repacked(module.weight):
                raise ValueError("a 4-bit weight was already repacked for the CPU kernel: load the model again")
            module.support_avx512bf16_for_cpu = False
    return model
