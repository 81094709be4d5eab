"""FedEx-LoRA (Singhal et al., ACL 2025): factor averages plus the exact residual in the backbone.

    B_bar = sum_i p_i B_i,   A_bar = sum_i p_i A_i
    Res   = sum_i p_i B_i A_i - B_bar A_bar               (rank <= (n + 1) r)
    W^{t+1} = W^t + s Res,   clients restart from (B_bar, A_bar)
    => W^{t+1} + s B_bar A_bar = W^t + s sum_i p_i B_i A_i   (exact)

Corrections to the official code: the residual is added in ``nn.Linear`` orientation (the
official GLUE path transposes it) and with the LoRA scale ``s`` (FedLLM-Factory omits it).
The residual travels as factors ``[p_1 B_1 ... p_n B_n, -B_bar] @ [A_1; ...; A_n; A_bar]``,
re-factored by the exact low-rank SVD to its numerical rank (``compress``), never densely.
Weights: sample-count weights like every other method here (the official code uses a plain
mean; pass equal weights to get it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from fedlora.lowrank import FactoredDelta
from fedlora.methods.base import (
    ClientUpload,
    GlobalState,
    Method,
    RoundResult,
    aggregation_weights,
    deltas_nbytes,
    factors_nbytes,
    next_state,
    stacked_products,
)
from fedlora.methods.fedit import average_factors
from fedlora.methods.registry import register


@register
class FedExLoRA(Method):
    name = "fedex_lora"
    summary = "FedAvg factors + exact residual merged into the backbone (factored)"
    changes_backbone = True

    @dataclass(frozen=True)
    class Settings:
        compress: bool = field(
            default=True, metadata={"help": "re-factor the residual to its numerical rank before sending"}
        )

    def aggregate(self, state: GlobalState, uploads: Sequence[ClientUpload], weights=None) -> RoundResult:
        p = aggregation_weights(uploads, weights)
        factors = average_factors(uploads, state.factors, p)
        deltas: dict[str, FactoredDelta] = {}
        report = {}
        for m, avg in factors.items():
            up, down = stacked_products(uploads, m, p)
            s = state.spec.scale()
            res = FactoredDelta.from_factors(up, down).add(avg.B.to(up.dtype), avg.A.to(up.dtype), -1.0).scaled(s)
            if self.settings.compress:
                res = res.compress()
            deltas[m] = res
            report[m] = {"residual_rank": float(res.rank)}
        return RoundResult(
            state=next_state(state, factors),
            backbone_delta=deltas,
            bytes_up=sum(u.nbytes() for u in uploads),
            bytes_down=factors_nbytes(factors) + deltas_nbytes(deltas),
            report=report,
        )
