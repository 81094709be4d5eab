"""FLoRA (Wang et al., NeurIPS 2024): stack the clients' LoRAs, merge, re-initialise.

    B_stack = [B_1, ..., B_n],  A_stack = [p_1 A_1; ...; p_n A_n]          (rank sum_i r_i)
    W^{t+1} = W^t + B_stack diag(s_i) A_stack = W^t + sum_i p_i s_i B_i A_i   (exact)
    next round: every client starts from a fresh LoRA (B = 0, A random) on W^{t+1}

Clients may have different ranks (``s_i = alpha / r_i``, or ``alpha / sqrt(r_i)`` with rsLoRA).
The downlink is the stacked factors (the paper's protocol); the fresh LoRA is drawn from a seed
every party knows (``seed``, round; :meth:`FLoRA.seeded_factors`), so it costs no bytes (the
Flower runtime does not send it: nodes rebuild it). A client of rank ``r_i`` takes the first
``r_i`` rows of the fresh ``A`` (still a standard init).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from fedlora.lowrank import FactoredDelta, lora_init
from fedlora.methods.base import (
    ClientContext,
    ClientStart,
    ClientUpload,
    Factors,
    GlobalState,
    LoRASpec,
    Method,
    ModuleFactors,
    RoundResult,
    aggregation_weights,
    deltas_nbytes,
    next_state,
    stacked_products,
)
from fedlora.methods.registry import register


def fresh_lora(shapes: Mapping[str, tuple[int, int]], rank: int, seed: int, *key: int) -> Factors:
    """A standard LoRA init for every module, reproducible from ``(seed, *key)``:
    ``B = 0``, ``A ~ U(-1/sqrt(d_in), 1/sqrt(d_in))``, modules drawn in sorted-name order."""
    gen = torch.Generator().manual_seed(hash_seed(seed, *key))
    out = {}
    for name in sorted(shapes):
        d_out, d_in = shapes[name]
        B, A = lora_init(d_out, d_in, rank, gen)
        out[name] = ModuleFactors(A=A, B=B)
    return {name: out[name] for name in shapes}


def hash_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (no Python ``hash`` randomisation)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


def truncate_rank(f: ModuleFactors, rank: int) -> ModuleFactors:
    assert f.A is not None and f.B is not None
    return ModuleFactors(A=f.A[:rank].clone(), B=f.B[:, :rank].clone())


@register
class FLoRA(Method):
    name = "flora"
    summary = "stack all client LoRAs, merge into the backbone, re-initialise (exact, any ranks)"
    heterogeneous_ranks = True
    ranks_above_global = True
    changes_backbone = True

    @dataclass(frozen=True)
    class Settings:
        seed: int = field(default=0, metadata={"help": "seed of the per-round fresh LoRA init"})

    def client_start(self, state: GlobalState, ctx: ClientContext) -> ClientStart:
        if ctx.rank <= state.spec.rank:
            return ClientStart(factors={m: truncate_rank(f, ctx.rank) for m, f in state.factors.items()})
        # A client wider than the global rank draws its own fresh init of its rank.
        return ClientStart(factors=fresh_lora(state.shapes(), ctx.rank, self.settings.seed, state.round, ctx.rank))

    def seeded_factors(self, round_: int, shapes: Mapping[str, tuple[int, int]], spec: LoRASpec) -> Factors | None:
        """The fresh global LoRA of round ``round_ >= 1`` (round 0's is the runtime's initial LoRA)."""
        if round_ < 1:
            return None
        return fresh_lora(shapes, spec.rank, self.settings.seed, round_)

    def aggregate(self, state: GlobalState, uploads: Sequence[ClientUpload], weights=None) -> RoundResult:
        p = aggregation_weights(uploads, weights)
        deltas: dict[str, FactoredDelta] = {}
        for m in state.factors:
            scales = [state.spec.scale(u.factors[m].rank) for u in uploads]
            up, down = stacked_products(uploads, m, p, scales)
            deltas[m] = FactoredDelta.from_factors(up, down)
        fresh = self.seeded_factors(state.round + 1, state.shapes(), state.spec)
        assert fresh is not None
        return RoundResult(
            state=next_state(state, fresh),
            backbone_delta=deltas,
            bytes_up=sum(u.nbytes() for u in uploads),
            bytes_down=deltas_nbytes(deltas),
            report={m: {"delta_rank": float(d.rank)} for m, d in deltas.items()},
        )
