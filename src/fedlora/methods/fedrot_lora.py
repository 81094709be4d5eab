"""FedRot-LoRA (Zhang et al., ICML 2026): rotate each client into the reference frame, then
average the factors.

For round ``t >= 1`` and each client ``i``, with the round-start global factors as reference:

    A-round (t odd):   R_i = argmin_{R in SO(r)} ||R^T A_i - A^t||_F     (A_i A^t^T = U S V^T, R = U V^T)
    B-round (t even):  R_i = argmin_{R in SO(r)} ||B_i R - B^t||_F       (B_i^T B^t = U S V^T)
    soft rotation:     R_i(lam) = polar((1 - lam) I + lam R_i)
    aligned factors:   B~_i = B_i R_i(lam),  A~_i = R_i(lam)^T A_i         (B~_i A~_i = B_i A_i)
    server:            B^{t+1} = sum_i p_i B~_i,   A^{t+1} = sum_i p_i A~_i

Round 0 is skipped (``B^0 = 0`` makes the B reference degenerate). ``lam = 0`` is FedIT,
``lam = 1`` the hard SO(r) rotation (``reflections=true`` allows the authors' O(r) hard variant).

Where: the authors rotate on the client after local training. The rotation depends only on the
client's trained factors and the round-start global factors, both of which the server holds,
so rotating on the server gives bit-for-bit the same aggregate with no client code and no extra
communication; that is what this implementation does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch

from fedlora.lowrank import alignment_rotation, rotate
from fedlora.methods.base import (
    AB,
    ClientUpload,
    GlobalState,
    Method,
    ModuleFactors,
    RoundResult,
    aggregation_weights,
    factors_nbytes,
    next_state,
    weighted_mean,
)
from fedlora.methods.registry import register


def aligned_side(round_: int, align: str, skip_first: bool) -> str | None:
    """Which factor is aligned in ``round_`` (``None``: no alignment this round)."""
    if skip_first and round_ == 0:
        return None
    if align == "alternate":
        return "A" if round_ % 2 == 1 else "B"
    return align


@register
class FedRotLoRA(Method):
    name = "fedrot_lora"
    summary = "Procrustes-rotate client factors to the global frame, then FedAvg (soft lam)"

    @dataclass(frozen=True)
    class Settings:
        lam: float = field(default=0.5, metadata={"help": "soft-rotation weight in [0, 1] (0 = FedIT, 1 = hard)"})
        align: Literal["alternate", "A", "B"] = field(
            default="alternate", metadata={"help": "factor aligned: A on odd and B on even rounds, or always one"}
        )
        skip_first: bool = field(default=True, metadata={"help": "no alignment in round 0 (B = 0 there)"})
        reflections: bool = field(default=False, metadata={"help": "with lam=1, allow O(r) (det -1) solutions"})

    def validate_settings(self) -> None:
        if not 0.0 <= self.settings.lam <= 1.0:
            raise ValueError(f"lam must lie in [0, 1], got {self.settings.lam}")

    def needs_global(self, round_: int) -> bool:
        return aligned_side(round_, self.settings.align, self.settings.skip_first) is not None

    def averaged_factors(self, round_: int) -> frozenset[str]:
        return AB  # the means of the rotated factors (B_i R_i, R_i^T A_i)

    def aggregate(self, state: GlobalState, uploads: Sequence[ClientUpload], weights=None) -> RoundResult:
        p = aggregation_weights(uploads, weights)
        side = aligned_side(state.round, self.settings.align, self.settings.skip_first)
        factors, report = {}, {}
        for m, ref in state.factors.items():
            Bs, As, moved = [], [], 0.0
            for u in uploads:
                f = u.factors[m]
                dt = torch.float64 if f.A.dtype == torch.float64 else torch.float32
                B, A = f.B.to(dt), f.A.to(dt)
                if side is not None:
                    R = alignment_rotation(
                        B,
                        A,
                        ref.B.to(dt),
                        ref.A.to(dt),
                        side,
                        lam=self.settings.lam,
                        special=not self.settings.reflections,
                    )
                    B, A = rotate(B, A, R)
                    moved = max(moved, float(torch.linalg.matrix_norm(R - torch.eye(R.shape[0], dtype=dt))))
                Bs.append(B)
                As.append(A)
            factors[m] = ModuleFactors(A=weighted_mean(As, p), B=weighted_mean(Bs, p))
            report[m] = {"max_rotation_distance": moved}
        return RoundResult(
            state=next_state(state, factors),
            backbone_delta={},
            bytes_up=sum(u.nbytes() for u in uploads),
            bytes_down=factors_nbytes(factors),
            report=report,
        )
