"""Atomic checkpoints of nested state: tensors to safetensors, everything else to JSON.

``flatten`` turns nested dicts/lists holding tensors and JSON values into a flat tensor dict
plus a JSON skeleton whose tensor leaves read ``{"__tensor__": key}``; ``unflatten`` inverts it.
A checkpoint folder is written under a temporary name and renamed into place, so a process
killed at any moment leaves either the previous checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

TENSORS = "state.safetensors"
META = "state.json"


def flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "s") -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}"
        tensors[key] = obj.detach().to("cpu").clone().contiguous()  # no shared storage in safetensors
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"{prefix}: dict keys must be str or int")
        return {"__dict__": [[k, flatten(v, tensors, f"{prefix}.{i}")] for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{prefix}: cannot checkpoint a {type(obj).__name__}")


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {k: unflatten(v, tensors) for k, v in skeleton["__dict__"]}
        if "__list__" in skeleton:
            return [unflatten(v, tensors) for v in skeleton["__list__"]]
    return skeleton


def save_checkpoint(folder: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``folder`` atomically (replacing an older checkpoint)."""
    target = Path(folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tensors: dict[str, torch.Tensor] = {}
        skeleton = flatten(state, tensors)
        save_file(tensors, str(tmp / TENSORS))
        (tmp / META).write_text(json.dumps(skeleton))
        for f in (tmp / TENSORS, tmp / META):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = target.with_name(f".{target.name}.old")
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_checkpoint(folder: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (falls back to the previous one if a
    crash interrupted the swap)."""
    target = Path(folder)
    if not (target / META).is_file():
        old = target.with_name(f".{target.name}.old")
        if (old / META).is_file():
            target = old
        else:
            raise FileNotFoundError(f"{folder}: no checkpoint")
    tensors = load_file(str(target / TENSORS))
    return unflatten(json.loads((target / META).read_text()), tensors)
