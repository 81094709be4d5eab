"""Atomic checkpoints of nested state: tensors to safetensors, everything else to JSON.

The nested state becomes a flat tensor dict plus a JSON skeleton with :mod:`fedlora.trees` (the
one tree serializer; it also reads checkpoints written before it). A checkpoint folder is
written under a temporary name and renamed into place, so a process killed at any moment leaves
either the previous checkpoint or the new one, never a mix; the temporary folder such a kill
leaves behind (``.checkpoint.*``) is removed by the next save or load.

The ``*_tree`` / ``*_from_tree`` pairs turn the engine's state (factors, the backbone ledger,
clients' records) into the trees a checkpoint stores, and back; the Ray workers receive the same
trees (:mod:`fedlora.engine.ray_runtime`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedlora import trees
from fedlora.atomic import atomic_folder, recover_folder, remove_stale
from fedlora.engine.client import ClientRecord
from fedlora.lowrank import FactoredDelta
from fedlora.methods import Factors, ModuleFactors

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


def factors_tree(factors: Factors) -> dict[str, dict[str, Any]]:
    return {m: {"A": f.A, "B": f.B} for m, f in factors.items()}


def factors_from_tree(tree: dict[str, dict[str, Any]]) -> Factors:
    return {m: ModuleFactors(A=f["A"], B=f["B"]) for m, f in tree.items()}


def ledger_tree(ledger: list[dict[str, FactoredDelta]]) -> list[dict[str, list[Any]]]:
    """Each round's deltas as ``{module: [ups, downs]}`` (the factor pairs, in order)."""
    return [{m: [d.ups, d.downs] for m, d in step.items()} for step in ledger]


def ledger_from_tree(tree: list[dict[str, list[Any]]]) -> list[dict[str, FactoredDelta]]:
    return [
        {
            m: FactoredDelta(int(ups[0].shape[0]), int(downs[0].shape[1]), list(ups), list(downs))
            for m, (ups, downs) in step.items()
            if ups
        }
        for step in tree
    ]


def record_tree(record: ClientRecord) -> dict[str, Any]:
    return {"cursor": record.cursor, "memory": record.memory, "optimizer": record.optimizer}


def record_from_tree(tree: dict[str, Any]) -> ClientRecord:
    return ClientRecord(cursor=tree["cursor"], memory=tree["memory"], optimizer=tree["optimizer"])
