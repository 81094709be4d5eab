"""Atomic checkpoints of nested state: tensors to safetensors, everything else to JSON.

The nested state becomes a flat tensor dict plus a JSON skeleton with :mod:`fedlora.trees` (the
one tree serializer; it also reads checkpoints written before it). A checkpoint folder is
written under a temporary name and renamed into place, so a process killed at any moment leaves
either the previous checkpoint or the new one, never a mix; the temporary folder such a kill
leaves behind (``.checkpoint.*``) is removed by the next save or load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedlora import trees
from fedlora.atomic import atomic_folder, recover_folder, remove_stale

TENSORS = "state.safetensors"
META = "state.json"


def save_checkpoint(folder: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``folder`` atomically (:func:`fedlora.atomic.atomic_folder`, replacing an
    older checkpoint); temporary folders of earlier saves killed midway are removed."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = trees.pack(state, tensors, "s")
    # the slow copy (CPU, no shared storage in safetensors), before any folder exists to be left behind
    tensors = {k: t.detach().to("cpu").clone().contiguous() for k, t in tensors.items()}
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
    state = trees.unpack(json.loads((target / META).read_text()), tensors)
    remove_stale(folder)
    return state
