"""Atomic checkpoints of nested state: tensors to safetensors, everything else to JSON.

``flatten`` turns nested dicts/lists holding tensors and JSON values into a flat tensor dict
plus a JSON skeleton whose tensor leaves read ``{"__tensor__": key}``; ``unflatten`` inverts it.
A checkpoint folder is written under a temporary name and renamed into place, so a process
killed at any moment leaves either the previous checkpoint or the new one, never a mix; the
temporary folder such a kill leaves behind (``.checkpoint.*``) is removed by the next save or load.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedlora.atomic import atomic_folder, recover_folder

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


def stale_folders(folder: str | Path) -> list[Path]:
    """Temporary folders of ``folder``'s saves that a killed process left behind: ``.<name>.tmp-*``
    (and the untagged ``.<name>.<random>`` of older versions), never ``.<name>.old``."""
    target = Path(folder)
    prefix, old = f".{target.name}.", f".{target.name}.old"
    if not target.parent.is_dir():
        return []
    return sorted(p for p in target.parent.iterdir() if p.name.startswith(prefix) and p.is_dir() and p.name != old)


def remove_stale(folder: str | Path) -> None:
    """Delete :func:`stale_folders` (best effort: a read-only folder is left as it is)."""
    for p in stale_folders(folder):
        shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(folder: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``folder`` atomically (:func:`fedlora.atomic.atomic_folder`, replacing an
    older checkpoint); temporary folders of earlier saves killed midway are removed."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten(state, tensors)  # the slow copy, before any folder exists to be left behind
    remove_stale(folder)
    with atomic_folder(folder) as tmp:
        save_file(tensors, str(tmp / TENSORS))
        (tmp / META).write_text(json.dumps(skeleton))


def load_checkpoint(folder: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    If a crash interrupted a save's swap, the previous checkpoint (``.<name>.old``) is moved back
    into place and read (:func:`fedlora.atomic.recover_folder`). Temporary folders of killed saves
    are removed once the read succeeds.
    """
    target = recover_folder(folder, complete=META)
    if not (target / META).is_file():
        raise FileNotFoundError(f"{folder}: no checkpoint")
    tensors = load_file(str(target / TENSORS))
    state = unflatten(json.loads((target / META).read_text()), tensors)
    remove_stale(folder)
    return state
