"""FFA-LoRA (Sun et al., ICLR 2024): A frozen at its shared random init, only B trained.

    A^t = A^0 for all t (identical on every client);   B^{t+1} = sum_i p_i B_i
    => B^{t+1} A^0 = sum_i p_i B_i A^0   (exact)

Uplink and downlink carry B only (A^0 is derived from the shared seed / round-0 broadcast).
"""

from __future__ import annotations

from typing import Sequence

from fedlora.methods.base import (
    ClientContext,
    ClientStart,
    ClientUpload,
    GlobalState,
    Method,
    ModuleFactors,
    RoundResult,
    aggregation_weights,
    clone_factors,
    factor_mean,
    factors_nbytes,
    next_state,
)
from fedlora.methods.registry import register

B_ONLY = frozenset({"B"})


@register
class FFALoRA(Method):
    name = "ffa_lora"
    summary = "freeze A at its random init, train and average B (exact)"

    def client_start(self, state: GlobalState, ctx: ClientContext) -> ClientStart:
        return ClientStart(factors=clone_factors(state.factors), trainable=B_ONLY, upload=B_ONLY)

    def uploaded_factors(self, state: GlobalState) -> frozenset[str]:
        return B_ONLY

    def averaged_factors(self, round_: int) -> frozenset[str]:
        return B_ONLY

    def sum_only(self, round_: int) -> bool:
        return True

    def aggregate(self, state: GlobalState, uploads: Sequence[ClientUpload], weights=None) -> RoundResult:
        p = aggregation_weights(uploads, weights)
        factors = {m: ModuleFactors(A=g.A.clone(), B=factor_mean(uploads, m, "B", p)) for m, g in state.factors.items()}
        return RoundResult(
            state=next_state(state, factors),
            backbone_delta={},
            bytes_up=sum(u.nbytes() for u in uploads),
            bytes_down=factors_nbytes(factors, B_ONLY),
        )
