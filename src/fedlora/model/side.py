"""Backbone deltas kept beside the base weights, in float32 factors: exact on any base.

Adding a round's backbone delta into the base weights in place (``merge``) is exact only for
float32 weights. Into bf16 weights it rounds most of a small delta away (a delta of 0.1 % of
``||W||`` loses about 78 % of itself, and the loss does not average out over rounds); a
bitsandbytes 4-bit or 8-bit weight cannot be added to at all. The ``side`` path keeps the
accumulated delta as a frozen low-rank pair beside each adapted layer::

    y = base(x) + (x D^T) U^T + s B (A x)          (U: d_out x k, D: k x d_in, float32)

so the function the clients train on is ``base + ledger`` up to float32 rounding, whatever the
base weights' dtype or packing. The pair is a forward hook on the layer's base module (the
``nn.Linear``, ``Conv1D``, ``Linear4bit`` or ``Linear8bitLt`` PEFT wraps); it holds no
parameters, so optimizers, ``state_dict`` and saved adapters never see it.

Growth: each delta is appended and the pair is re-factored exactly (QR of the stacked factors +
a small SVD, :meth:`~fedlora.lowrank.FactoredDelta.compress_reporting`), keeping components
above ``rtol * s_max`` (``rtol = 0``: all but rounding-level ones) and at most ``max_rank`` of
them (``0``: no cap, exact). The fraction of the accumulated delta's energy a cap drops is
reported (:meth:`SidePath.add` and :func:`side_report`), never silent. The re-factoring is
deterministic, so replaying a ledger (a resume, a Flower node catching up) rebuilds the same
pair bit for bit.

Cost per step: two thin matmuls per adapted layer (``k`` columns), plus a float32 copy of the
layer's input where the compute dtype is lower; memory ``4 (d_out + d_in) k`` bytes per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedlora.lowrank import FactoredDelta

_ATTR = "_fedlora_side"


@dataclass
class SidePath:
    """The accumulated delta of one layer, ``U @ D`` (float32, on the layer's device)."""

    d_out: int
    d_in: int
    rtol: float = 0.0
    max_rank: int = 0
    delta: FactoredDelta = field(init=False)
    dropped: float = 0.0
    """Energy the caps dropped so far, as a fraction of the accumulated delta's energy at each drop, summed."""
    handle: Any = None

    def __post_init__(self) -> None:
        self.delta = FactoredDelta(self.d_out, self.d_in)

    @property
    def rank(self) -> int:
        return self.delta.rank

    @torch.no_grad()
    def add(self, delta: FactoredDelta, device: torch.device, alpha: float = 1.0) -> float:
        """``U D += alpha * delta``, re-factored; returns the fraction of energy a cap dropped."""
        if delta.is_empty or alpha == 0.0:
            return 0.0
        up, down = delta.factors(torch.float32)
        grown = FactoredDelta(self.d_out, self.d_in, list(self.delta.ups), list(self.delta.downs))
        grown.add(up.to(device), down.to(device), alpha)
        self.delta, dropped = grown.compress_reporting(rtol=self.rtol, max_rank=self.max_rank or None)
        self.dropped += dropped
        return dropped

    def forward_hook(self, module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        if self.delta.is_empty:
            return output
        up, down = self.delta.ups[0], self.delta.downs[0]
        x = inputs[0]
        side = (x.to(down.dtype) @ down.mT) @ up.mT
        return output + side.to(output.dtype)

    def dense(self) -> torch.Tensor:
        """``U @ D`` as a dense float64 CPU matrix (tests and small layers only)."""
        return self.delta.dense(torch.float64)


def side_of(base: nn.Module) -> SidePath | None:
    """The side path attached to ``base``, if any."""
    return base.__dict__.get(_ATTR)


def attach(base: nn.Module, d_out: int, d_in: int, *, rtol: float = 0.0, max_rank: int = 0) -> SidePath:
    """The side path of ``base``, attached (an empty one, as a forward hook) on first use."""
    side = side_of(base)
    if side is None:
        side = SidePath(d_out, d_in, rtol=rtol, max_rank=max_rank)
        side.handle = base.register_forward_hook(side.forward_hook)
        base.__dict__[_ATTR] = side  # a plain attribute: not a submodule, not in state_dict
    return side


def detach(base: nn.Module) -> None:
    """Remove ``base``'s side path (the layer computes ``base(x)`` again)."""
    side = base.__dict__.pop(_ATTR, None)
    if side is not None and side.handle is not None:
        side.handle.remove()


def module_device(base: nn.Module) -> torch.device:
    for t in base.parameters():
        return t.device
    for t in base.buffers():
        return t.device
    return torch.device("cpu")


def side_report(model: nn.Module) -> dict[str, float]:
    """``side_rank_mean``, ``side_rank_max``, ``side_dropped_max`` over the model's side paths
    and ``side_bytes`` (their float32 factors), or ``{}`` without any."""
    sides = [s for m in model.modules() if (s := side_of(m)) is not None]
    if not sides:
        return {}
    ranks = [s.rank for s in sides]
    return {
        "side_rank_mean": sum(ranks) / len(ranks),
        "side_rank_max": float(max(ranks)),
        "side_dropped_max": max(s.dropped for s in sides),
        "side_bytes": float(sum(4 * (s.d_out + s.d_in) * s.rank for s in sides)),
    }
