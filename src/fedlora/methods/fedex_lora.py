"""FedEx-LoRA (Singhal et al., ACL 2025): factor averages plus the exact residual in the backbone.

    B_bar = sum_i p_i B_i,   A_bar = sum_i p_i A_i
    Res   = sum_i p_i B_i A_i - B_bar A_bar               (rank <= (n - 1) r)
    W^{t+1} = W^t + s Res,   clients restart from (B_bar, A_bar)
    => W^{t+1} + s B_bar A_bar = W^t + s sum_i p_i B_i A_i   (exact)

Corrections to the official code: the residual is added in ``nn.Linear`` orientation (the
official GLUE path transposes it) and with the LoRA scale ``s`` (FedLLM-Factory omits it).
The residual travels as factors, never densely. Since ``sum_i p_i = 1``,

    Res = sum_i p_i (B_i - B_bar)(A_i - A_bar) = sum_{i != k} p_i (B_i - B_bar)(A_i - A_k)

for any client ``k`` (here the one of largest weight): factors
``[p_i (B_i - B_bar)]_{i != k} @ [A_i - A_k]_{i != k}`` of rank ``(n - 1) r``, the residual's
true rank, with no cancellation between large terms (stacking ``[p_1 B_1 ... p_n B_n, -B_bar]``
leaves rounding noise at the scale of the individual products, which ``compress``'s relative
cut does not always remove, inflating the residual's rank); then re-factored by the exact
low-rank SVD to its numerical rank (``compress``). One client has no residual.
Weights: sample-count weights like every other method here (the official code uses a plain
mean; pass equal weights to get it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from fedlora.lowrank import FactoredDelta
from fedlora.methods.base import (
    ClientUpload,
    GlobalState,
    Method,
    ModuleFactors,
    RoundResult,
    _required,
    aggregation_weights,
    deltas_nbytes,
    factors_nbytes,
    next_state,
)
from fedlora.methods.fedit import average_factors
from fedlora.methods.registry import register


def residual_factors(
    uploads: Sequence[ClientUpload], module: str, p: Sequence[float], avg: ModuleFactors
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, Q)`` with ``P Q = sum_i p_i B_i A_i - B_bar A_bar`` as
    ``[p_i (B_i - B_bar)]_{i != k} @ [A_i - A_k]_{i != k}`` (``k``: the largest weight)."""
    assert avg.A is not None and avg.B is not None
    dt = avg.B.dtype
    k = max(range(len(uploads)), key=lambda i: p[i])
    A_k = _required(uploads[k], module, "A").to(dt)
    ups, downs = [], []
    for i, u in enumerate(uploads):
        if i == k:
            continue
        ups.append((_required(u, module, "B").to(dt) - avg.B) * p[i])
        downs.append(_required(u, module, "A").to(dt) - A_k)
    if not ups:
        return avg.B.new_zeros(avg.B.shape[0], 0), avg.A.new_zeros(0, avg.A.shape[1])
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0)


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
        s = state.spec.scale()
        for m, avg in factors.items():
            res = FactoredDelta.from_factors(*residual_factors(uploads, m, p, avg)).scaled(s)
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
