"""FRLoRA (Yan et al., ICLR 2025): merge the averaged LoRA into the backbone, restart from the same LoRA.

    B_bar = sum_i p_i B_i,    A_bar = sum_i p_i A_i
    W^{t+1} = W^t + s (B_bar A_bar - B_0 A_0),    every round's clients restart from (B_0, A_0)
    => W^{t+1} + s B_0 A_0 = W^t + s B_bar A_bar

so the model a round ends with is FedIT's (the same inexact product of averaged factors), but the
update is folded into the backbone each round: the sum of the rounds' updates is not limited to
rank r ("residual" learning, the update space FedSmoothLoRA keeps and builds on), and every round
starts from the same LoRA instead of the previous average. ``(B_0, A_0)`` is the global LoRA of
round 0 and never changes, so after round 0 nothing but the backbone delta goes down the wire.

Choices where the official code (``IAMJackYan/FRLoRA``) differs, each documented:

* initialisation: the official code starts from a PiSSA-like LoRA (``SVD(W_0) = U S V^T``,
  ``B_0 = U_r (S_r/s)^1/2``, ``A_0 = (S_r/s)^1/2 V_r^T``, ``W <- W_0 - s B_0 A_0``): that is the
  runtime's ``lora.init: pissa`` (PEFT's ``init_lora_weights="pissa"``; the exported backbone
  delta includes the shift). By default ``(B_0, A_0)`` is the runtime's LoRA init like every
  other method's (B_0 = 0, so the delta is ``s B_bar A_bar``, rank r). The aggregation rule, the
  merge and the restart are FRLoRA's; the formula above holds for any ``(B_0, A_0)``.
* weights: the official code forces uniform weights (``weights: uniform``, the default here);
  ``weights: samples`` uses the sample-count weights of every other method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch

from fedlora.lowrank import FactoredDelta
from fedlora.methods.base import (
    ClientUpload,
    GlobalState,
    Method,
    RoundResult,
    aggregation_weights,
    deltas_nbytes,
    next_state,
)
from fedlora.methods.fedit import average_factors
from fedlora.methods.registry import register


@register
class FRLoRA(Method):
    name = "frlora"
    summary = "FedAvg factors merged into the backbone each round, LoRA restarted from its init"
    changes_backbone = True

    @dataclass(frozen=True)
    class Settings:
        weights: Literal["uniform", "samples"] = field(
            default="uniform", metadata={"help": "uniform (the official code) or samples (sample-count weights)"}
        )

    def sum_only(self, round_: int) -> bool:
        return True

    def aggregate(self, state: GlobalState, uploads: Sequence[ClientUpload], weights=None) -> RoundResult:
        if weights is None and self.settings.weights == "uniform":
            weights = [1.0] * len(uploads)
        p = aggregation_weights(uploads, weights)
        avg = average_factors(uploads, state.factors, p)
        s = state.spec.scale()
        deltas: dict[str, FactoredDelta] = {}
        for m, f in avg.items():
            assert f.A is not None and f.B is not None
            g = state.factors[m]
            assert g.A is not None and g.B is not None
            if torch.count_nonzero(g.B) == 0:  # B_0 = 0: B_bar A_bar - B_0 A_0 = B_bar A_bar (rank r)
                delta = FactoredDelta.from_factors(f.B, f.A)
            else:  # [B_bar, -B_0] @ [A_bar; A_0], re-factored to its numerical rank (<= 2r)
                B0, A0 = g.B.to(f.B.dtype), g.A.to(f.A.dtype)
                delta = FactoredDelta.from_factors(torch.cat([f.B, -B0], 1), torch.cat([f.A, A0], 0)).compress()
            deltas[m] = delta.scaled(s)
        return RoundResult(
            state=next_state(state, state.factors),
            backbone_delta=deltas,
            bytes_up=sum(u.nbytes() for u in uploads),
            bytes_down=deltas_nbytes(deltas),
            report={m: {"delta_rank": float(d.rank)} for m, d in deltas.items()},
        )
