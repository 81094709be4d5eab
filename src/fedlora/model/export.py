"""Export a run's result as a fully merged transformers model (``save_pretrained``)."""

from __future__ import annotations

from pathlib import Path

import torch

from fedlora.model.adapter_io import DELTA_NAME, load_deltas
from fedlora.model.backbone import apply_backbone_delta
from fedlora.model.loading import Kind, load_model, load_tokenizer


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

    The backbone delta is applied in float32 accumulation, then PEFT's ``merge_and_unload`` adds
    ``s B A``; the result loads with plain ``AutoModel*.from_pretrained(out_dir)``.
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    base = load_model(model_name, kind, dtype=dtype, num_labels=num_labels)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    delta_file = adapter_dir / DELTA_NAME
    if delta_file.exists():
        apply_backbone_delta(model, load_deltas(delta_file))
    merged = model.merge_and_unload()
    out = Path(out_dir)
    merged.save_pretrained(out)
    load_tokenizer(model_name).save_pretrained(out)
    return out
