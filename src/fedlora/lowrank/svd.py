"""Exact SVD of matrices kept in factored form ``M = U_p @ D_p`` (never formed densely).

For ``M = P Q`` with ``P`` (d_out x q) and ``Q`` (q x d_in), ``q << min(d_out, d_in)``:

    P = Q_P R_P,   Q^T = Q_Q R_Q              (thin Householder QR, O((d_out + d_in) q^2))
    M = Q_P (R_P R_Q^T) Q_Q^T                 (core C = R_P R_Q^T is q x q)
    C = u s v^T                               (small SVD, O(q^3))
    M = (Q_P u) s (Q_Q v)^T                   (exact SVD of M, to rounding)

This is the exact SVD of ``M`` up to floating-point rounding; no sketch, no randomness. The
sum of weighted products ``sum_i p_i B_i A_i`` is the product of the stacked factors
``[p_1 B_1 ... p_n B_n] @ [A_1; ...; A_n]`` (see :func:`stack_products`).

All functions accept a leading batch dimension (several modules of one shape at once).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor

Split = Literal["balanced", "left", "right"]
SPLITS: tuple[str, ...] = ("balanced", "left", "right")


def compute_dtype(dtype: torch.dtype | None, *tensors: Tensor) -> torch.dtype:
    """The float dtype to compute in: ``dtype`` if given, else float64 if any input is
    float64, else float32 (half-precision inputs are always promoted)."""
    if dtype is not None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"compute dtype must be float32 or float64, got {dtype}")
        return dtype
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@dataclass(frozen=True)
class LowRankSVD:
    """Thin SVD ``M = U diag(S) Vh`` of a low-rank matrix (optionally batched).

    ``U``: (..., d_out, k), ``S``: (..., k) descending, ``Vh``: (..., k, d_in).
    """

    U: Tensor
    S: Tensor
    Vh: Tensor

    @property
    def rank(self) -> int:
        return int(self.S.shape[-1])

    def truncate(self, k: int) -> LowRankSVD:
        """The best rank-k approximation (Eckart-Young): the first k components."""
        return LowRankSVD(self.U[..., :, :k], self.S[..., :k], self.Vh[..., :k, :])

    def components(self, start: int, stop: int) -> LowRankSVD:
        """Components ``start..stop-1`` (0-based), e.g. a residual band."""
        return LowRankSVD(self.U[..., :, start:stop], self.S[..., start:stop], self.Vh[..., start:stop, :])

    def dense(self) -> Tensor:
        """``U diag(S) Vh`` as a dense matrix (for tests and small layers only)."""
        return (self.U * self.S.unsqueeze(-2)) @ self.Vh

    def energy(self) -> Tensor:
        """Squared Frobenius norm, ``sum_j s_j^2``."""
        return (self.S**2).sum(-1)


def stack_products(
    ups: Sequence[Tensor], downs: Sequence[Tensor], weights: Sequence[float] | Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Stack ``sum_i w_i up_i @ down_i`` into one product ``P @ Q``.

    ``P = [w_1 up_1, ..., w_n up_n]`` (d_out x sum q_i), ``Q = [down_1; ...; down_n]``.
    Weights are applied to the up factors only. Ranks may differ between terms.
    """
    if len(ups) != len(downs) or not ups:
        raise ValueError(f"need matching, non-empty factor lists (got {len(ups)} and {len(downs)})")
    if weights is None:
        scaled = list(ups)
    else:
        w = [float(x) for x in weights]
        if len(w) != len(ups):
            raise ValueError(f"{len(w)} weights for {len(ups)} terms")
        scaled = [u * wi for u, wi in zip(ups, w)]
    return torch.cat(scaled, dim=-1), torch.cat(list(downs), dim=-2)


def lowrank_svd(up: Tensor, down: Tensor, *, dtype: torch.dtype | None = None) -> LowRankSVD:
    """Exact thin SVD of ``up @ down`` without forming it.

    ``up``: (..., d_out, q), ``down``: (..., q, d_in). Returns ``k = min(q, d_out, d_in)``
    components (trailing ones may be zero when the product's rank is lower). Computes in
    ``dtype`` (float32 or float64; default: float64 if an input is float64, else float32).
    """
    if up.shape[-1] != down.shape[-2]:
        raise ValueError(f"inner dimensions differ: up {tuple(up.shape)} @ down {tuple(down.shape)}")
    cd = compute_dtype(dtype, up, down)
    up = up.to(cd)
    down = down.to(cd)
    q_up, r_up = torch.linalg.qr(up, mode="reduced")  # (d_out, a), (a, q)
    q_dn, r_dn = torch.linalg.qr(down.mT, mode="reduced")  # (d_in, b), (b, q)
    core = r_up @ r_dn.mT  # (a, b), a, b <= q
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    return LowRankSVD(q_up @ u, s, vh @ q_dn.mT)


def energy_rank(S: Tensor, tau: float) -> int:
    """Smallest k with ``sum_{j<=k} s_j^2 >= tau * sum_j s_j^2`` (1-D ``S``).

    Evaluated as ``tail_k <= (1 - tau) * total`` with exact tail sums, so ``tau = 1`` keeps
    every non-zero component and ``tau = 0`` keeps none. An all-zero ``S`` gives 0.
    """
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must lie in [0, 1], got {tau}")
    if S.ndim != 1:
        raise ValueError("energy_rank takes one spectrum (1-D)")
    e = S.double() ** 2
    # tail[k] = sum_{j >= k} e_j, k = 0..n; tail[n] = 0. The total is tail[0] itself (summed in
    # the same order), so that tau = 0 gives 0 exactly.
    tail = torch.cat([e.flip(0).cumsum(0).flip(0), e.new_zeros(1)])
    total = float(tail[0])
    if total == 0.0:
        return 0
    allowed = (1.0 - tau) * total
    return int(torch.nonzero(tail <= allowed)[0, 0])


def split_factors(svd: LowRankSVD, split: Split = "balanced") -> tuple[Tensor, Tensor]:
    """Factor ``U diag(S) Vh`` into ``(B, A)`` with ``B @ A == U diag(S) Vh``.

    - ``balanced``: ``B = U S^1/2``, ``A = S^1/2 Vh`` (then ``B^T B = A A^T = diag(S)``);
    - ``left``: ``B = U S``, ``A = Vh`` (FedSmoothLoRA's NLG code, FlexLoRA in many ports);
    - ``right``: ``B = U``, ``A = S Vh``.
    """
    S = svd.S
    if split == "balanced":
        root = S.sqrt()
        return svd.U * root.unsqueeze(-2), root.unsqueeze(-1) * svd.Vh
    if split == "left":
        return svd.U * S.unsqueeze(-2), svd.Vh
    if split == "right":
        return svd.U, S.unsqueeze(-1) * svd.Vh
    raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")


def truncated_factors(
    up: Tensor, down: Tensor, rank: int, split: Split = "balanced", *, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """``SVD_rank(up @ down)`` split into ``(B, A)``, padded with zero components when the
    product has fewer than ``rank`` components, so shapes are always (d_out, rank), (rank, d_in)."""
    svd = lowrank_svd(up, down, dtype=dtype).truncate(rank)
    return pad_rank(*split_factors(svd, split), rank)


def pad_rank(B: Tensor, A: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Append zero components so that ``B`` has ``rank`` columns and ``A`` ``rank`` rows."""
    missing = rank - B.shape[-1]
    if missing > 0:
        B = torch.cat([B, B.new_zeros(*B.shape[:-1], missing)], dim=-1)
        A = torch.cat([A, A.new_zeros(*A.shape[:-2], missing, A.shape[-1])], dim=-2)
    return B, A
