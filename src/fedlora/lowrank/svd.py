"""Exact SVD of matrices kept in factored form ``M = U_p @ D_p`` (never formed densely).

For ``M = P Q`` with ``P`` (d_out x q) and ``Q`` (q x d_in), ``q << min(d_out, d_in)``:

    P = Q_P R_P,   Q^T = Q_Q R_Q              (thin Householder QR, O((d_out + d_in) q^2))
    M = Q_P (R_P R_Q^T) Q_Q^T                 (core C = R_P R_Q^T is q x q)
    C = u s v^T                               (small SVD, O(q^3))
    M = (Q_P u) s (Q_Q v)^T                   (exact SVD of M, to rounding)

This is the exact SVD of ``M`` up to floating-point rounding; no sketch, no randomness. The
sum of weighted products ``sum_i p_i B_i A_i`` is the product of the stacked factors
``[p_1 B_1 ... p_n B_n] @ [A_1; ...; A_n]`` (see :func:`stack_products`).

:func:`implicit_svd` stops after the small SVD: it keeps ``Q_P`` and ``Q_Q`` as Householder
reflectors (LAPACK ``geqrf`` form) and forms singular vectors only on request, for the leading
``k`` components (:meth:`ImplicitSVD.leading`). Applying the reflectors to the ``k`` wanted columns
of ``u`` costs ``O(d q k)`` instead of ``O(d q^2)`` for forming ``Q`` and multiplying, so callers that
need all singular values but few vectors (FedMomentum: top r plus a residual band) save most of
the work after the QR. :func:`lowrank_svd` is ``implicit_svd(...).leading()``.

All functions accept a leading batch dimension (several modules of one shape at once).
"""

from __future__ import annotations

import functools
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
    ups: Sequence[Tensor],
    downs: Sequence[Tensor],
    weights: Sequence[float] | Tensor | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Stack ``sum_i w_i up_i @ down_i`` into one product ``P @ Q``.

    ``P = [w_1 up_1, ..., w_n up_n]`` (d_out x sum q_i), ``Q = [down_1; ...; down_n]``.
    Weights are applied to the up factors only. Ranks may differ between terms. ``dtype``:
    the result's (default: the inputs' promoted dtype).

    Both results are fresh tensors laid out for LAPACK: ``P`` column-major (each ``w_i up_i``
    written once, straight into place) and ``Q`` row-major, i.e. ``Q^T`` column-major, so
    :func:`implicit_svd` with ``overwrite=True`` factors both in place without another copy.
    """
    if len(ups) != len(downs) or not ups:
        raise ValueError(f"need matching, non-empty factor lists (got {len(ups)} and {len(downs)})")
    if weights is None:
        w = [1.0] * len(ups)
    else:
        w = [float(x) for x in weights]
        if len(w) != len(ups):
            raise ValueError(f"{len(w)} weights for {len(ups)} terms")
    dt = dtype if dtype is not None else functools.reduce(torch.promote_types, [t.dtype for t in (*ups, *downs)])
    first = ups[0]
    q = sum(int(u.shape[-1]) for u in ups)
    P_t = torch.empty(*first.shape[:-2], q, first.shape[-2], dtype=dt, device=first.device)
    start = 0
    for u, wi in zip(ups, w):
        block = P_t[..., start : start + u.shape[-1], :]
        src = u.mT if u.dtype == dt else u.mT.to(dt)
        if wi == 1.0:
            block.copy_(src)
        else:
            torch.mul(src, wi, out=block)
        start += int(u.shape[-1])
    return P_t.mT, torch.cat([d.to(dt) for d in downs], dim=-2)


def _geqrf(x: Tensor, overwrite: bool) -> tuple[Tensor, Tensor]:
    """LAPACK ``geqrf`` of ``x`` (..., m, n): in place when ``overwrite`` and ``x`` is already
    column-major (no copy of the tall matrix, no fresh pages to fault in), else on a copy."""
    if overwrite and x.mT.is_contiguous():
        tau = x.new_empty(*x.shape[:-2], min(int(x.shape[-2]), int(x.shape[-1])))
        try:
            return torch.geqrf(x, out=(x, tau))
        except RuntimeError:  # a torch that refuses the aliased output: factor a copy
            pass
    return torch.geqrf(x)


def _apply_q(reflectors: Tensor, tau: Tensor, small: Tensor) -> Tensor:
    """``Q @ small`` for the orthonormal ``Q`` (..., m, a) held as Householder reflectors
    (``torch.geqrf`` output, first ``a`` columns) and ``small`` (..., a, k)."""
    m, a = reflectors.shape[-2], reflectors.shape[-1]
    k = small.shape[-1]
    if k == 0 or a == 0:
        return small.new_zeros(*small.shape[:-2], m, k)
    if 2 * k > a:
        # Most columns wanted: forming Q (orgqr) and one GEMM is as cheap and batches better.
        return torch.linalg.householder_product(reflectors, tau) @ small
    padded = small.new_zeros(*small.shape[:-2], m, k)
    padded[..., :a, :] = small
    return torch.ormqr(reflectors, tau, padded)


@dataclass(frozen=True)
class ImplicitSVD:
    """The exact SVD ``up @ down = U diag(S) Vh`` with ``S`` formed and ``U``, ``Vh`` implicit.

    ``U = Q_up @ core_u`` and ``Vh = core_vh @ Q_down^T``, where ``Q_up`` (..., d_out, a) and
    ``Q_down`` (..., d_in, b) are held as Householder reflectors and ``tau`` (``torch.geqrf``
    output; only the first ``a`` resp. ``b`` columns of ``*_reflectors`` are used). Optionally
    batched like :class:`LowRankSVD`; ``S``: (..., k) descending.
    """

    S: Tensor
    up_reflectors: Tensor
    up_tau: Tensor
    core_u: Tensor
    down_reflectors: Tensor
    down_tau: Tensor
    core_vh: Tensor

    @property
    def rank(self) -> int:
        return int(self.S.shape[-1])

    def energy(self) -> Tensor:
        """Squared Frobenius norm, ``sum_j s_j^2``."""
        return (self.S**2).sum(-1)

    def __getitem__(self, i: int) -> ImplicitSVD:
        """Batch element ``i`` (views)."""
        return ImplicitSVD(
            self.S[i],
            self.up_reflectors[i],
            self.up_tau[i],
            self.core_u[i],
            self.down_reflectors[i],
            self.down_tau[i],
            self.core_vh[i],
        )

    def leading(self, k: int | None = None) -> LowRankSVD:
        """The first ``k`` components (all if ``None``) with their singular vectors formed;
        equal to ``lowrank_svd(up, down).truncate(k)`` up to rounding."""
        k = self.rank if k is None else max(0, min(int(k), self.rank))
        a, b = self.core_u.shape[-2], self.core_vh.shape[-1]
        U = _apply_q(self.up_reflectors[..., :a], self.up_tau, self.core_u[..., :k])
        V = _apply_q(self.down_reflectors[..., :b], self.down_tau, self.core_vh[..., :k, :].mT)
        return LowRankSVD(U, self.S[..., :k], V.mT)


def implicit_svd(up: Tensor, down: Tensor, *, dtype: torch.dtype | None = None, overwrite: bool = False) -> ImplicitSVD:
    """Exact SVD of ``up @ down`` without forming it, singular vectors kept implicit.

    ``up``: (..., d_out, q), ``down``: (..., q, d_in). ``k = min(q, d_out, d_in)`` components
    (trailing ones may be zero when the product's rank is lower). Computes in ``dtype``
    (float32 or float64; default: float64 if an input is float64, else float32).

    ``overwrite=True`` lets the QRs overwrite ``up`` and ``down`` when they are already in the
    compute dtype and LAPACK's layout (``up`` column-major, ``down`` row-major; what
    :func:`stack_products` returns): the caller must not use them afterwards.
    """
    if up.shape[-1] != down.shape[-2]:
        raise ValueError(f"inner dimensions differ: up {tuple(up.shape)} @ down {tuple(down.shape)}")
    cd = compute_dtype(dtype, up, down)
    h_up, tau_up = _geqrf(up.to(cd), overwrite)  # R_up = triu of the first a rows, a = min(d_out, q)
    h_dn, tau_dn = _geqrf(down.to(cd).mT, overwrite)  # down^T = Q_dn R_dn, b = min(d_in, q)
    a, b = tau_up.shape[-1], tau_dn.shape[-1]
    core = h_up[..., :a, :].triu() @ h_dn[..., :b, :].triu().mT  # (a, b) = R_up R_dn^T
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    return ImplicitSVD(s, h_up, tau_up, u, h_dn, tau_dn, vh)


def lowrank_svd(up: Tensor, down: Tensor, *, dtype: torch.dtype | None = None) -> LowRankSVD:
    """Exact thin SVD of ``up @ down`` without forming it.

    ``up``: (..., d_out, q), ``down``: (..., q, d_in). Returns ``k = min(q, d_out, d_in)``
    components (trailing ones may be zero when the product's rank is lower). Computes in
    ``dtype`` (float32 or float64; default: float64 if an input is float64, else float32).
    """
    return implicit_svd(up, down, dtype=dtype).leading()


def energy_rank(S: Tensor, tau: float) -> int:
    """Smallest k with ``sum_{j<=k} s_j^2 >= tau * sum_j s_j^2`` (1-D ``S``).

    Evaluated as ``tail_k <= (1 - tau) * total`` with exact tail sums, so ``tau = 1`` keeps
    every non-zero component and ``tau = 0`` keeps none. An all-zero ``S`` gives 0.
    """
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must lie in [0, 1], got {tau}")
    tail = _tails(S)
    total = float(tail[0])  # summed in the same order as the tails, so tau = 0 gives 0 exactly
    if total == 0.0:
        return 0
    return int(torch.nonzero(tail <= (1.0 - tau) * total)[0, 0])


def budget_rank(S: Tensor, allowed: float) -> int:
    """Smallest k whose dropped tail ``sum_{j>k} s_j^2`` is at most ``allowed`` (1-D ``S``; an
    energy, e.g. a fraction of another matrix's ``||.||_F^2``). ``allowed <= 0`` keeps every
    non-zero component."""
    tail = _tails(S)
    return int(torch.nonzero(tail <= max(float(allowed), 0.0))[0, 0])


def _tails(S: Tensor) -> Tensor:
    """``tail[k] = sum_{j >= k} s_j^2`` for k = 0..n (float64; ``tail[n] = 0``)."""
    if S.ndim != 1:
        raise ValueError("a rank rule takes one spectrum (1-D)")
    e = S.double() ** 2
    return torch.cat([e.flip(0).cumsum(0).flip(0), e.new_zeros(1)])


def product_energy(up: Tensor, down: Tensor) -> float:
    """``||up @ down||_F^2 = <up^T up, down down^T>`` from the q x q Gram matrices, in float64:
    O((d_out + d_in) q^2), never the d_out x d_in product."""
    up, down = up.double(), down.double()
    return float(((up.mT @ up) * (down @ down.mT)).sum())


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
