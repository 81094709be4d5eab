"""Pure tensor algebra of low-rank adapters: no ``nn.Module``, no I/O.

Shapes follow ``nn.Linear.weight``: ``B`` is d_out x r, ``A`` is r x d_in, the update ``s B A``.
"""

from fedlora.lowrank.batched import (
    group_by_shape,
    implicit_svd_many,
    leading_many,
    lowrank_svd_many,
    svd_device,
    truncated_svd_many,
)
from fedlora.lowrank.delta import FactoredDelta
from fedlora.lowrank.lora import lora_init, lora_scale
from fedlora.lowrank.procrustes import alignment_rotation, polar, procrustes, rotate, soft_rotation
from fedlora.lowrank.svd import (
    SPLITS,
    ImplicitSVD,
    LowRankSVD,
    budget_rank,
    compute_dtype,
    energy_rank,
    implicit_svd,
    lowrank_svd,
    pad_rank,
    product_energy,
    split_factors,
    stack_products,
    truncated_factors,
)

__all__ = [
    "SPLITS",
    "FactoredDelta",
    "ImplicitSVD",
    "LowRankSVD",
    "alignment_rotation",
    "budget_rank",
    "compute_dtype",
    "energy_rank",
    "group_by_shape",
    "implicit_svd",
    "implicit_svd_many",
    "leading_many",
    "lora_init",
    "lora_scale",
    "lowrank_svd",
    "lowrank_svd_many",
    "pad_rank",
    "polar",
    "procrustes",
    "product_energy",
    "rotate",
    "soft_rotation",
    "split_factors",
    "stack_products",
    "svd_device",
    "truncated_factors",
    "truncated_svd_many",
]
