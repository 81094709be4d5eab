"""Export a run's result as a fully merged transformers model (``save_pretrained``)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fedlora.model.adapter_io import DELTA_NAME, load_deltas
from fedlora.model.backbone import apply_backbone_delta
from fedlora.model.binding import quiet_checkpointing_deprecation
from fedlora.model.loading import Kind, load_model, load_tokenizer, strip_quantization_config


def export_merged(
    model_name: str,
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    kind: Kind = "causal_lm",
    num_labels: int = 2,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Base model + backbone delta + LoRA merged into the weights, saved with ``save_pretrained``.

    The merge always happens on a full-precision base: the base is loaded in float32 whatever
    ``dtype`` is, the backbone delta is added (float32 accumulation), then PEFT's
    ``merge_and_unload`` adds ``s B A``; only the merged model is cast to ``dtype`` for saving.
    A base whose weights are not dense floats (a bitsandbytes/GPTQ/packed-GGUF checkpoint) is
    refused, since merging into packed weights is not exact; a base merely *flagged* as quantized
    while holding dense floats (a dequantized GGUF, e.g. an old fedlora model cache) loses the flag.
    The merged model never carries its base's ``quantization_config`` and loads with plain
    ``AutoModel*.from_pretrained(out_dir)``.
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    base = load_model(model_name, kind, dtype=torch.float32, num_labels=num_labels)
    _as_plain_model(base, model_name)
    with quiet_checkpointing_deprecation():  # PEFT reads a name transformers deprecated
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    delta_file = adapter_dir / DELTA_NAME
    if delta_file.exists():
        apply_backbone_delta(model, load_deltas(delta_file))
    merged = model.merge_and_unload()
    _as_plain_model(merged, model_name)
    if dtype != torch.float32:
        merged = merged.to(dtype)
    out = Path(out_dir)
    merged.save_pretrained(out)
    load_tokenizer(model_name).save_pretrained(out)
    return out


def _as_plain_model(model: nn.Module, name: str) -> None:
    """Drop every quantization marker of a model whose parameters are all dense floats
    (``hf_quantizer``, ``quantization_method``, ``is_quantized``, ``config.quantization_config``);
    raise ``ValueError`` if some parameter is not (the weights are really quantized)."""
    packed = [n for n, p in model.named_parameters() if not p.is_floating_point()]
    if packed:
        raise ValueError(
            f"{name}: the base model's weights are quantized (e.g. {packed[0]}); export merges onto "
            "full-precision weights, so name an unquantized copy of the model"
        )
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None or not hasattr(config, "to_dict"):
            continue
        for attr in ("hf_quantizer", "quantization_method"):
            if attr in module.__dict__:
                delattr(module, attr)
        if "is_quantized" in module.__dict__:
            module.is_quantized = False
        strip_quantization_config(config)
        if getattr(config, "_is_quantized", False):
            config._is_quantized = False
