"""RoLoRA (Chen et al., NeurIPS 2025): alternate which factor is trained and shared.

    B-round: A frozen (shared);  clients train B;  B^{t+1} = sum_i p_i B_i   (exact)
    A-round: B frozen (shared);  clients train A;  A^{t+1} = sum_i p_i A_i   (exact)

Schedule (open question in the sources): alternation per round, the factor of round 0 set by
``first`` (default ``B``, as in the FedRot-LoRA code's ``initialshare: 'B'``; FedLLM-Factory
starts with A). Starting with B matters: with the standard init ``B^0 = 0`` an A-round at
round 0 trains nothing (the gradient of A is ``s B^T g x^T = 0``). Uplink and downlink carry
only the active factor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

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


def active_factor(round_: int, first: str) -> str:
    """The factor trained and shared in ``round_``: ``first`` on even rounds, the other on odd."""
    other = "A" if first == "B" else "B"
    return first if round_ % 2 == 0 else other


@register
class RoLoRA(Method):
    name = "rolora"
    summary = "alternate rounds training/sharing only B or only A (exact)"

    @dataclass(frozen=True)
    class Settings:
        first: Literal["B", "A"] = field(default="B", metadata={"help": "factor trained in round 0"})

    def _active(self, state: GlobalState) -> frozenset[str]:
        return frozenset({active_factor(state.round, self.settings.first)})

    def client_start(self, state: GlobalState, ctx: ClientContext) -> ClientStart:
        active = self._active(state)
        return ClientStart(factors=clone_factors(state.factors), trainable=active, upload=active)

    def uploaded_factors(self, state: GlobalState) -> frozenset[str]:
        return self._active(state)

    def averaged_factors(self, round_: int) -> frozenset[str]:
        return frozenset({active_factor(round_, self.settings.first)})

    def sum_only(self, round_: int) -> bool:
        return True

    def aggregate(self, state: GlobalState, uploads: Sequence[ClientUpload], weights=None) -> RoundResult:
        p = aggregation_weights(uploads, weights)
        active = active_factor(state.round, self.settings.first)
        factors = {}
        for m, g in state.factors.items():
            mean = factor_mean(uploads, m, active, p)
            factors[m] = ModuleFactors(A=mean, B=g.B.clone()) if active == "A" else ModuleFactors(A=g.A.clone(), B=mean)
        return RoundResult(
            state=next_state(state, factors),
            backbone_delta={},
            bytes_up=sum(u.nbytes() for u in uploads),
            bytes_down=factors_nbytes(factors, frozenset({active})),
        )
