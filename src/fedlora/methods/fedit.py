"""FedIT (Zhang et al., ICASSP 2024): FedAvg on the LoRA factors.

    B^{t+1} = sum_i p_i B_i,    A^{t+1} = sum_i p_i A_i,    W unchanged.

Not exact: ``B^{t+1} A^{t+1} != sum_i p_i B_i A_i`` in general. The baseline every other
method is measured against.
"""

from __future__ import annotations

from typing import Sequence

from fedlora.methods.base import (
    AB,
    ClientUpload,
    GlobalState,
    Method,
    ModuleFactors,
    RoundResult,
    aggregation_weights,
    factor_mean,
    factors_nbytes,
    next_state,
)
from fedlora.methods.registry import register


def average_factors(uploads: Sequence[ClientUpload], modules, p: Sequence[float]) -> dict[str, ModuleFactors]:
    """``(sum p_i B_i, sum p_i A_i)`` for every module."""
    return {m: ModuleFactors(A=factor_mean(uploads, m, "A", p), B=factor_mean(uploads, m, "B", p)) for m in modules}


@register
class FedIT(Method):
    name = "fedit"
    summary = "FedAvg of A and B separately (inexact baseline)"

    def averaged_factors(self, round_: int) -> frozenset[str]:
        return AB

    def sum_only(self, round_: int) -> bool:
        return True

    def aggregate(self, state: GlobalState, uploads: Sequence[ClientUpload], weights=None) -> RoundResult:
        p = aggregation_weights(uploads, weights)
        factors = average_factors(uploads, state.factors, p)
        return RoundResult(
            state=next_state(state, factors),
            backbone_delta={},
            bytes_up=sum(u.nbytes() for u in uploads),
            bytes_down=factors_nbytes(factors),
        )
