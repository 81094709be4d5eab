"""Nested state <-> (JSON skeleton, flat tensor dict): how a tree of tensors crosses a file or a wire.

Checkpoints (``engine/checkpoint.py``) and the Flower nodes' client records (``flower/client_app.py``)
both store nested dicts/lists/tuples of tensors and JSON scalars as one safetensors file plus a
JSON skeleton. :func:`pack` writes the skeleton, each tensor leaf a reference
``{"__tensor__": key, "dtype": ...}`` into the flat dict (keys are positions, so they never
collide whatever the dict keys hold); :func:`unpack` inverts it exactly (dict key types, tuples
and dtypes included). Tags: ``__dict__`` (string keys, a JSON object), ``__items__`` (int keys:
``[[key, value], ...]``), ``__list__``, ``__tuple__``.

:func:`unpack` also reads the two formats written before this module existed: the checkpoint's
(``__dict__`` as a list of pairs, ``__list__``, no dtype) and the client records' (plain JSON
lists), so existing run folders and node folders stay readable. No pickle anywhere.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

Skeleton = Any


def pack(obj: Any, tensors: dict[str, Tensor], prefix: str = "t") -> Skeleton:
    """The JSON skeleton of ``obj``; its tensors are added to ``tensors`` (as they are: no copy)."""
    if isinstance(obj, Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix, "dtype": str(obj.dtype).removeprefix("torch.")}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: pack(v, tensors, f"{prefix}.{i}") for i, (k, v) in enumerate(obj.items())}}
        if not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in obj):
            raise TypeError(f"{prefix}: dict keys must be str or int")
        return {"__items__": [[k, pack(v, tensors, f"{prefix}.{i}")] for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        items = [pack(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else {"__list__": items}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{prefix}: cannot store a {type(obj).__name__}")


def unpack(skeleton: Skeleton, tensors: Mapping[str, Tensor]) -> Any:
    """The tree :func:`pack` made ``skeleton`` from (tensors taken from ``tensors``)."""
    if isinstance(skeleton, list):  # the client records' older format: plain lists
        return [unpack(v, tensors) for v in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if "__tensor__" in skeleton:
        t = tensors[skeleton["__tensor__"]]
        return t.to(getattr(torch, skeleton["dtype"])) if "dtype" in skeleton else t
    if "__dict__" in skeleton:
        d = skeleton["__dict__"]
        pairs = d.items() if isinstance(d, dict) else d  # the checkpoint's older format: a list of pairs
        return {k: unpack(v, tensors) for k, v in pairs}
    if "__items__" in skeleton:
        return {k: unpack(v, tensors) for k, v in skeleton["__items__"]}
    if "__list__" in skeleton:
        return [unpack(v, tensors) for v in skeleton["__list__"]]
    if "__tuple__" in skeleton:
        return tuple(unpack(v, tensors) for v in skeleton["__tuple__"])
    return skeleton


def to_bytes(obj: Any) -> bytes:
    """``obj`` as one self-contained blob: an 8-byte length, the JSON skeleton, a safetensors body
    (tensors copied to the CPU, contiguous). What crosses a process boundary (Ray workers): no pickle."""
    import json

    from safetensors.torch import save

    tensors: dict[str, Tensor] = {}
    head = json.dumps(pack(obj, tensors)).encode()
    body = save({k: t.detach().to("cpu").contiguous().clone() for k, t in tensors.items()})
    return len(head).to_bytes(8, "little") + head + body


def from_bytes(blob: bytes) -> Any:
    """The tree :func:`to_bytes` wrote."""
    import json

    from safetensors.torch import load

    n = int.from_bytes(blob[:8], "little")
    return unpack(json.loads(blob[8 : 8 + n]), load(blob[8 + n :]))


__all__ = ["Skeleton", "from_bytes", "pack", "to_bytes", "unpack"]
