"""FedSA-LoRA (Guo et al., ICLR 2025): share A, keep B personal.

    clients train A and B;  only A is uploaded:  A^{t+1} = sum_i p_i A_i
    client i's model: W + s B_i A^{t+1}, with B_i kept locally from its last round

A client joining for the first time starts from the global B (the standard init, zeros).
The server's own B never changes, so the *global* model is ``W + s B^0 A^{t+1}`` (the base
model when ``B^0 = 0``); evaluate FedSA-LoRA with the clients' personal models, reported
separately from global metrics. Client memory: ``<module>.B``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from torch import Tensor

from fedlora.methods.base import (
    AB,
    ClientContext,
    ClientStart,
    ClientUpload,
    Factors,
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

A_ONLY = frozenset({"A"})


@register
class FedSALoRA(Method):
    name = "fedsa_lora"
    summary = "share and average A, keep B local per client (personalised)"

    def client_start(self, state: GlobalState, ctx: ClientContext) -> ClientStart:
        factors = {}
        for m, g in state.factors.items():
            B = ctx.memory.get(f"{m}.B")
            factors[m] = ModuleFactors(A=g.A.clone(), B=(g.B if B is None else B).clone())
        return ClientStart(factors=factors, trainable=AB, upload=A_ONLY)

    def personal_factors(self, state: GlobalState, memory: Mapping[str, Tensor]) -> Factors | None:
        """Client i's model: ``W + s B_i A^t`` (global A, its own last B; the global B if it has none)."""
        return {m: ModuleFactors(A=g.A.clone(), B=memory.get(f"{m}.B", g.B).clone()) for m, g in state.factors.items()}

    def client_factors(self, state: GlobalState, upload: ClientUpload) -> Factors | None:
        """Unknown to the server: the client's LoRA is ``(B_i, A_i)`` with a B it keeps."""
        return None

    def client_finish(
        self, state: GlobalState, ctx: ClientContext, start: ClientStart, trained: Factors
    ) -> tuple[Factors, dict[str, Tensor]]:
        upload = {m: f.only(A_ONLY) for m, f in trained.items()}
        memory = {f"{m}.B": f.B.detach().clone() for m, f in trained.items() if f.B is not None}
        return upload, memory

    def uploaded_factors(self, state: GlobalState) -> frozenset[str]:
        return A_ONLY

    def averaged_factors(self, round_: int) -> frozenset[str]:
        return A_ONLY  # the shared part; each client's B is its own

    def sum_only(self, round_: int) -> bool:
        return True

    def aggregate(self, state: GlobalState, uploads: Sequence[ClientUpload], weights=None) -> RoundResult:
        p = aggregation_weights(uploads, weights)
        factors = {m: ModuleFactors(A=factor_mean(uploads, m, "A", p), B=g.B.clone()) for m, g in state.factors.items()}
        return RoundResult(
            state=next_state(state, factors),
            backbone_delta={},
            bytes_up=sum(u.nbytes() for u in uploads),
            bytes_down=factors_nbytes(factors, A_ONLY),
        )
