"""LoRA conventions shared by every method: the scale and the standard initialisation."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def lora_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """PEFT's scaling: ``s = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def lora_init(
    d_out: int, d_in: int, rank: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """PEFT's default init: ``B = 0``, ``A ~ U(-1/sqrt(d_in), 1/sqrt(d_in))``.

    (Kaiming-uniform with ``a = sqrt(5)`` on an r x d_in weight has bound ``1/sqrt(d_in)``.)
    """
    bound = 1.0 / math.sqrt(d_in)
    A = (torch.rand(rank, d_in, generator=generator, dtype=dtype) * 2.0 - 1.0) * bound
    return torch.zeros(d_out, rank, dtype=dtype), A
