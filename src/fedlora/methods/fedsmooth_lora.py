"""FedSmoothLoRA (Wang et al., 2026): each client starts from a Round-Matching matrix plus a
Gradient-Aligned matrix estimated on its data; the server merges the rank-r aggregate.

Client c in round t (per module, ``s`` the LoRA scale, ``m = d_out``):

    W_rm   = zeta_t (B_c^{t-1} A_c^{t-1} - B_s^t A_s^t)      (0 at t = 0 or without memory)
    G      = mean gradient of the loss w.r.t. W at W^t + s W_rm, over K local batches
    G      = U S V^T;   B_ga = U[:, r:2r] m^{1/4} / sqrt(gamma);   A_ga = V^T[:r] m^{1/4} / sqrt(gamma)
    (B_0, A_0) = SVD_r(B_ga A_ga + W_rm)                     ((B_ga, A_ga) when W_rm = 0)
    W_local = W^t - s B_ga A_ga                              (client-only shift while training)
    train (B, A) from (B_0, A_0);  upload (B_c^t, A_c^t) = SVD_r(B A - B_ga A_ga)

Server: ``M = sum_c p_c B_c^t A_c^t``, ``(B_s, A_s) = SVD_r(M)``, ``W^{t+1} = W^t + s B_s A_s``;
the residual ``M - SVD_r(M)`` is discarded, the global LoRA is reset to zero (all of the
aggregate lives in the backbone), ``(B_s, A_s)`` is broadcast once (clients merge it and keep it
for the next Round-Matching matrix).

``zeta_t``: ``constant`` (zeta) or cosine ``decay`` from zeta to ``zeta_min`` over the run.
Choices where the sources disagree or are silent: SVD split ``balanced`` (the image code; the
NLG code puts S on B: ``split=left``); a client's memory is used for Round-Matching only if
it is from the previous round (a client that skipped rounds restarts from the new global
model, ``W_rm = 0``); the gradient SVD is exact (``ga_svd=lowrank`` uses
``torch.svd_lowrank`` with ``ga_niter`` iterations, as LoRA-GA's fork does).
Every SVD of a sum of products here is the exact low-rank one on stacked factors.

Each client reports what its two rank-r re-factorisations drop, pooled over modules:
``rm_dropped = ||X - SVD_r(X)||_F / ||W_rm||_F`` with ``X = B_ga A_ga + W_rm`` (the part of the
Round-Matching term its start loses; rounds with a memory only) and
``upload_dropped = ||Y - SVD_r(Y)||_F / ||Y||_F`` with ``Y = B A - B_ga A_ga``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from torch import Tensor

from fedlora.lowrank import FactoredDelta, lowrank_svd, pad_rank, split_factors, stack_products, truncated_factors
from fedlora.methods.base import (
    ClientContext,
    ClientStart,
    ClientUpload,
    Factors,
    GlobalState,
    Method,
    ModuleFactors,
    RoundResult,
    aggregation_weights,
    deltas_nbytes,
    next_state,
    stacked_products,
)
from fedlora.methods.registry import register


def zeta_at(round_: int, num_rounds: int | None, mode: str, zeta: float, zeta_min: float) -> float:
    """``constant``: ``zeta``; ``decay``: ``zeta_min + (zeta - zeta_min)(1 + cos(pi t / T)) / 2``."""
    if mode == "constant":
        return zeta
    if num_rounds is None or num_rounds <= 0:
        raise ValueError("zeta_mode=decay needs the run's number of rounds")
    return zeta_min + 0.5 * (zeta - zeta_min) * (1.0 + math.cos(math.pi * round_ / num_rounds))


def round_matching(prev: ModuleFactors, merged: ModuleFactors, zeta: float) -> FactoredDelta:
    """``W_rm = zeta (B_c A_c - B_s A_s)`` as a rank-2r factored delta."""
    assert prev.A is not None and prev.B is not None and merged.A is not None and merged.B is not None
    d = FactoredDelta(int(prev.B.shape[0]), int(prev.A.shape[1]))
    return d.add(prev.B, prev.A, zeta).add(merged.B.to(prev.B.dtype), merged.A.to(prev.A.dtype), -zeta)


def gradient_aligned_factors(
    grad: Tensor, rank: int, gamma: float, *, svd: str = "full", niter: int = 4
) -> ModuleFactors:
    """LoRA-GA's "ArB2r" init with "stable" scale from a full-weight gradient ``G`` (d_out x d_in):
    ``B_ga = U[:, r:2r] m^{1/4}/sqrt(gamma)``, ``A_ga = V^T[:r] m^{1/4}/sqrt(gamma)``, ``m = d_out``."""
    d_out, d_in = grad.shape
    if 2 * rank > min(d_out, d_in):
        raise ValueError(f"gradient-aligned init needs 2r <= min(d_out, d_in); r={rank}, shape {d_out}x{d_in}")
    g = grad.to(torch.float64 if grad.dtype == torch.float64 else torch.float32)
    if svd == "lowrank":
        U, _, V = torch.svd_lowrank(g, q=min(4 * rank, d_out, d_in), niter=niter)
        Vh = V.mT
    else:
        U, _, Vh = torch.linalg.svd(g, full_matrices=False)
    c = d_out**0.25 / math.sqrt(gamma)
    return ModuleFactors(A=Vh[:rank].contiguous() * c, B=U[:, rank : 2 * rank].contiguous() * c)


def truncate_with_loss(up: Tensor, down: Tensor, rank: int, split: str) -> tuple[ModuleFactors, float]:
    """``SVD_r(up @ down)`` as factors, and the energy it drops, ``sum_{j > r} s_j^2``."""
    svd = lowrank_svd(up, down)
    B, A = pad_rank(*split_factors(svd.truncate(rank), split), rank)
    return ModuleFactors(A=A, B=B), float((svd.S[rank:].double() ** 2).sum())


def smooth_init(ga: ModuleFactors, rm: FactoredDelta | None, rank: int, split: str) -> tuple[ModuleFactors, float]:
    """``SVD_r(B_ga A_ga + W_rm)`` (``(B_ga, A_ga)`` itself without a Round-Matching term), and
    the energy the truncation drops: ``||B_ga A_ga + W_rm - SVD_r(.)||_F^2``."""
    assert ga.A is not None and ga.B is not None
    if rm is None or rm.is_empty:
        return ModuleFactors(A=ga.A.clone(), B=ga.B.clone()), 0.0
    up, down = rm.factors(ga.B.dtype)
    return truncate_with_loss(torch.cat([ga.B, up], 1), torch.cat([ga.A, down], 0), rank, split)


def smooth_upload(trained: ModuleFactors, ga: ModuleFactors, rank: int, split: str) -> tuple[ModuleFactors, float]:
    """The re-factorised upload ``SVD_r(B A - B_ga A_ga)``, and the energy it drops."""
    assert trained.A is not None and trained.B is not None and ga.A is not None and ga.B is not None
    dt = torch.float64 if trained.B.dtype == torch.float64 else torch.float32
    up, down = stack_products([trained.B.to(dt), ga.B.to(dt)], [trained.A.to(dt), ga.A.to(dt)], [1.0, -1.0])
    return truncate_with_loss(up, down, rank, split)


def relative_loss(dropped: float, total: float) -> float:
    """``sqrt(dropped / total)``: the relative Frobenius error of a truncation (0 for an empty total)."""
    return math.sqrt(max(dropped, 0.0) / total) if total > 0 else 0.0


@register
class FedSmoothLoRA(Method):
    name = "fedsmooth_lora"
    summary = "Round-Matching + Gradient-Aligned client init; rank-r aggregate merged each round"
    changes_backbone = True
    needs_gradient = True

    @dataclass(frozen=True)
    class Settings:
        gamma: float = field(
            default=64.0,
            metadata={"help": "LoRA-GA stable-scale gamma (paper: 64; larger = smaller GA start, docs/results.md 2.1)"},
        )
        zeta: float = field(default=1.0, metadata={"help": "Round-Matching coefficient (start value for decay)"})
        zeta_mode: Literal["constant", "decay"] = field(
            default="constant", metadata={"help": "constant (IID) or cosine decay over rounds (non-IID)"}
        )
        zeta_min: float = field(default=0.5, metadata={"help": "final zeta of the cosine decay"})
        split: Literal["balanced", "left", "right"] = field(
            default="balanced", metadata={"help": "how S is split in every SVD_r"}
        )
        ga_svd: Literal["full", "lowrank"] = field(default="full", metadata={"help": "SVD of the gradient"})
        ga_niter: int = field(default=4, metadata={"help": "power iterations for ga_svd=lowrank"})

    def validate_settings(self) -> None:
        if self.settings.gamma <= 0:
            raise ValueError(f"gamma must be positive, got {self.settings.gamma}")

    # ---- client ---------------------------------------------------------------------------
    def _round_matching(self, state: GlobalState, ctx: ClientContext) -> dict[str, FactoredDelta]:
        mem_round = ctx.memory.get("round")
        if state.round == 0 or mem_round is None or int(mem_round) != state.round - 1:
            return {}
        zeta = zeta_at(state.round, ctx.num_rounds, self.settings.zeta_mode, self.settings.zeta, self.settings.zeta_min)
        out = {}
        for m in state.factors:
            if f"{m}.Bs" not in state.method_state:
                continue
            prev = ModuleFactors(A=ctx.memory[f"{m}.A"], B=ctx.memory[f"{m}.B"])
            merged = ModuleFactors(A=state.method_state[f"{m}.As"], B=state.method_state[f"{m}.Bs"])
            out[m] = round_matching(prev, merged, zeta)
        return out

    def client_start(self, state: GlobalState, ctx: ClientContext) -> ClientStart:
        if ctx.grad_fn is None:
            raise ValueError("fedsmooth_lora needs the runtime's gradient function (ctx.grad_fn)")
        s = state.spec.scale(ctx.rank)
        rm = self._round_matching(state, ctx)
        grads = ctx.grad_fn({m: d.scaled(s) for m, d in rm.items()})
        factors, shift = {}, {}
        dropped = rm_energy = 0.0
        for m in state.factors:
            ga = gradient_aligned_factors(
                grads[m], ctx.rank, self.settings.gamma, svd=self.settings.ga_svd, niter=self.settings.ga_niter
            )
            factors[m], lost = smooth_init(ga, rm.get(m), ctx.rank, self.settings.split)
            shift[m] = FactoredDelta.from_factors(ga.B * (-s), ga.A)
            dropped += lost
            rm_energy += rm[m].energy() if m in rm else 0.0
        report = {"rm_dropped": relative_loss(dropped, rm_energy)} if rm_energy > 0 else {}
        return ClientStart(factors=factors, local_shift=shift, report=report)

    def client_finish(
        self, state: GlobalState, ctx: ClientContext, start: ClientStart, trained: Factors
    ) -> tuple[Factors, dict[str, Tensor]]:
        s = state.spec.scale(ctx.rank)
        upload, memory = {}, {"round": torch.tensor(state.round)}
        dropped = kept = 0.0
        for m, f in trained.items():
            shift = start.local_shift[m]  # = -s B_ga A_ga
            ga = ModuleFactors(A=shift.downs[0], B=shift.ups[0] / (-s))
            u, lost = smooth_upload(f, ga, ctx.rank, self.settings.split)
            upload[m] = u
            memory[f"{m}.A"], memory[f"{m}.B"] = u.A, u.B
            dropped += lost
            kept += FactoredDelta.from_factors(u.B, u.A).energy()
        start.report["upload_dropped"] = relative_loss(dropped, dropped + kept)
        return upload, memory

    # ---- server ---------------------------------------------------------------------------
    def aggregate(self, state: GlobalState, uploads: Sequence[ClientUpload], weights=None) -> RoundResult:
        p = aggregation_weights(uploads, weights)
        r, s = state.spec.rank, state.spec.scale()
        factors, deltas, method_state = {}, {}, {}
        for m in state.factors:
            Bs, As = truncated_factors(*stacked_products(uploads, m, p), r, self.settings.split)
            deltas[m] = FactoredDelta.from_factors(Bs * s, As)
            method_state[f"{m}.Bs"], method_state[f"{m}.As"] = Bs, As
            factors[m] = ModuleFactors(A=torch.zeros_like(As), B=torch.zeros_like(Bs))
        return RoundResult(
            state=next_state(state, factors, method_state),
            backbone_delta=deltas,
            bytes_up=sum(u.nbytes() for u in uploads),
            bytes_down=deltas_nbytes(deltas),
        )
