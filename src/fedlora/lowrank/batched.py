"""Batching the exact low-rank SVD across modules of one shape.

A model adapts many modules of few shapes (e.g. 32 layers x {q, k, v, o} share 4096 x 4096).
Stacking a shape group into one batched QR/SVD call removes per-call overhead, which
dominates for small ranks, and keeps the GPU busy. Results equal the per-module calls.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Mapping

import torch
from torch import Tensor

from fedlora.lowrank.svd import LowRankSVD, lowrank_svd


def group_by_shape(pairs: Mapping[str, tuple[Tensor, Tensor]]) -> dict[tuple[int, ...], list[str]]:
    """Module names grouped by ``(d_out, q, d_in)`` of their ``(up, down)`` pair, in input order."""
    groups: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for name, (up, down) in pairs.items():
        groups[(int(up.shape[-2]), int(up.shape[-1]), int(down.shape[-1]))].append(name)
    return dict(groups)


def lowrank_svd_many(
    pairs: Mapping[str, tuple[Tensor, Tensor]],
    *,
    dtype: torch.dtype | None = None,
    max_batch_elements: int = 1 << 27,
) -> dict[str, LowRankSVD]:
    """:func:`lowrank_svd` of every ``up @ down``, batched per shape group.

    ``max_batch_elements`` bounds the elements of one stacked input (memory), splitting large
    groups into chunks.
    """
    out: dict[str, LowRankSVD] = {}
    for (d_out, q, d_in), names in group_by_shape(pairs).items():
        per_item = max(1, (d_out + d_in) * max(q, 1))
        chunk = max(1, max_batch_elements // per_item)
        for start in range(0, len(names), chunk):
            block = names[start : start + chunk]
            if len(block) == 1:
                up, down = pairs[block[0]]
                out[block[0]] = lowrank_svd(up, down, dtype=dtype)
                continue
            ups = torch.stack([pairs[n][0] for n in block])
            downs = torch.stack([pairs[n][1] for n in block])
            svd = lowrank_svd(ups, downs, dtype=dtype)
            for i, n in enumerate(block):
                out[n] = LowRankSVD(svd.U[i], svd.S[i], svd.Vh[i])
    return out
