"""FlexLoRA (Bai et al., NeurIPS 2024): exact full-size aggregate, SVD, per-client ranks.

    M = sum_i p_i s_i B_i A_i                         (s_i = scale of client i's rank r_i)
    M = U diag(S) V^T                                 (exact, from the stacked factors)
    client j (rank r_j):  B_j A_j = U_{r_j} S_{r_j} V_{r_j}^T / s_j
    W unchanged; the energy beyond each client's rank is discarded.

The split of ``S`` is a setting (``split``; default ``balanced``: ``B = U S^1/2``,
``A = S^1/2 V^T``). Every split here is product-preserving; FedLLM-Factory's
``B = U S^1/2 / 2``, ``A = V^T`` is not, and is not offered. The global factors have the global
rank, which must be at least every client's rank; a client of rank ``r_j`` takes the leading
``r_j`` components, rescaled so that its product is ``SVD_{r_j}(M) / s_j``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Sequence

from fedlora.lowrank import lowrank_svd_many, pad_rank, split_factors
from fedlora.methods.base import (
    ClientContext,
    ClientStart,
    ClientUpload,
    GlobalState,
    Method,
    ModuleFactors,
    RoundResult,
    aggregation_weights,
    factors_nbytes,
    next_state,
    stacked_products,
)
from fedlora.methods.registry import register


def rescaled_truncation(f: ModuleFactors, rank: int, c: float, split: str) -> ModuleFactors:
    """Leading ``rank`` components of ``f`` with the product multiplied by ``c``, the factor of
    ``c`` placed as the split places ``S``."""
    assert f.A is not None and f.B is not None
    B, A = f.B[:, :rank].clone(), f.A[:rank].clone()
    if c != 1.0:
        if split == "balanced":
            B, A = B * math.sqrt(c), A * math.sqrt(c)
        elif split == "left":
            B = B * c
        else:
            A = A * c
    return ModuleFactors(A=A, B=B)


@register
class FlexLoRA(Method):
    name = "flexlora"
    summary = "exact aggregate, SVD, redistributed at each client's own rank (heterogeneous ranks)"
    heterogeneous_ranks = True

    @dataclass(frozen=True)
    class Settings:
        split: Literal["balanced", "left", "right"] = field(
            default="balanced", metadata={"help": "how S is split between B and A"}
        )

    def client_start(self, state: GlobalState, ctx: ClientContext) -> ClientStart:
        if ctx.rank > state.spec.rank:
            raise ValueError(
                f"flexlora: client {ctx.client_id} has rank {ctx.rank} above the global rank "
                f"{state.spec.rank}; set the global rank to the largest client rank"
            )
        c = 1.0 if state.round == 0 else state.spec.scale() / state.spec.scale(ctx.rank)
        factors = {m: rescaled_truncation(f, ctx.rank, c, self.settings.split) for m, f in state.factors.items()}
        return ClientStart(factors=factors)

    def aggregate(self, state: GlobalState, uploads: Sequence[ClientUpload], weights=None) -> RoundResult:
        p = aggregation_weights(uploads, weights)
        s_g = state.spec.scale()
        pairs = {}
        for m in state.factors:
            scales = [state.spec.scale(u.factors[m].rank) / s_g for u in uploads]
            pairs[m] = stacked_products(uploads, m, p, scales)  # product = M / s_g
        svds = lowrank_svd_many(pairs)
        factors, report = {}, {}
        r = state.spec.rank
        for m, svd in svds.items():
            top = svd.truncate(r)
            B, A = pad_rank(*split_factors(top, self.settings.split), r)
            factors[m] = ModuleFactors(A=A, B=B)
            total = float(svd.energy())
            report[m] = {"kept_energy": float(top.energy()) / total if total > 0 else 1.0}
        return RoundResult(
            state=next_state(state, factors),
            backbone_delta={},
            bytes_up=sum(u.nbytes() for u in uploads),
            bytes_down=factors_nbytes(factors),
            report=report,
        )
