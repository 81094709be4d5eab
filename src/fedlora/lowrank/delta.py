"""A backbone update kept as a sum of low-rank terms, never as a dense d_out x d_in matrix.

``Delta = sum_k up_k @ down_k`` with ``up_k`` (d_out x q_k), ``down_k`` (q_k x d_in), in the
orientation of ``nn.Linear.weight``. Terms are concatenated lazily; :meth:`compress` folds them
into one exact SVD-based pair when the stored rank grows (dropping only components below a
relative tolerance), so a ledger of many rounds stays as small as its true rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedlora.lowrank.svd import lowrank_svd, product_energy, split_factors


@dataclass
class FactoredDelta:
    """A low-rank update of one weight matrix, ``sum_k up_k @ down_k``."""

    d_out: int
    d_in: int
    ups: list[Tensor] = field(default_factory=list)
    downs: list[Tensor] = field(default_factory=list)

    @classmethod
    def from_factors(cls, up: Tensor, down: Tensor) -> FactoredDelta:
        d = cls(int(up.shape[0]), int(down.shape[1]))
        d.add(up, down)
        return d

    @property
    def rank(self) -> int:
        """Stored rank (sum of the terms' inner sizes; an upper bound on the true rank)."""
        return sum(int(u.shape[1]) for u in self.ups)

    @property
    def is_empty(self) -> bool:
        return self.rank == 0

    def add(self, up: Tensor, down: Tensor, scale: float = 1.0) -> FactoredDelta:
        """Append the term ``scale * up @ down``."""
        if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(f"bad term shapes: up {tuple(up.shape)}, down {tuple(down.shape)}")
        if up.shape[0] != self.d_out or down.shape[1] != self.d_in:
            raise ValueError(
                f"term {tuple(up.shape[:1])}x{tuple(down.shape[1:])} does not fit a {self.d_out}x{self.d_in} delta"
            )
        if up.shape[1] == 0:
            return self
        self.ups.append(up * scale if scale != 1.0 else up)
        self.downs.append(down)
        return self

    def extend(self, other: FactoredDelta, scale: float = 1.0) -> FactoredDelta:
        """Append every term of ``other`` (times ``scale``)."""
        for u, d in zip(other.ups, other.downs):
            self.add(u, d, scale)
        return self

    def copy(self) -> FactoredDelta:
        """A new delta with the same terms (the tensors are shared, the term lists are not)."""
        return FactoredDelta(self.d_out, self.d_in, list(self.ups), list(self.downs))

    def plus(self, other: FactoredDelta, scale: float = 1.0) -> FactoredDelta:
        """A new delta ``self + scale * other`` (this one's terms first; neither input changes)."""
        return self.copy().extend(other, scale)

    def scaled(self, scale: float) -> FactoredDelta:
        """A copy multiplied by ``scale``."""
        return FactoredDelta(self.d_out, self.d_in, [u * scale for u in self.ups], list(self.downs))

    def factors(
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> tuple[Tensor, Tensor]:
        """The stacked pair ``(up, down)`` with ``up @ down == Delta`` (cast to ``dtype`` and moved
        to ``device`` where given)."""
        if self.is_empty:
            ref = dtype or torch.float32
            return torch.zeros(self.d_out, 0, dtype=ref), torch.zeros(0, self.d_in, dtype=ref)
        up = torch.cat([u.to(device=device, dtype=dtype) for u in self.ups], dim=1)
        down = torch.cat([d.to(device=device, dtype=dtype) for d in self.downs], dim=0)
        return up, down

    def compress(self, *, rtol: float = 0.0, max_rank: int | None = None) -> FactoredDelta:
        """Re-factor into one balanced pair via the exact low-rank SVD.

        Keeps components with ``s_j > rtol * s_max`` (``rtol = 0`` drops only exact zeros and
        rounding-level components below ``eps * s_max * q``), at most ``max_rank`` of them.
        """
        return self.compress_reporting(rtol=rtol, max_rank=max_rank)[0]

    def compress_reporting(self, *, rtol: float = 0.0, max_rank: int | None = None) -> tuple[FactoredDelta, float]:
        """:meth:`compress`, and the fraction of ``||Delta||_F^2`` the kept components leave out
        (``sum_{j>keep} s_j^2 / sum_j s_j^2``; 0 when nothing but rounding-level parts is dropped)."""
        if self.is_empty:
            return FactoredDelta(self.d_out, self.d_in), 0.0
        up, down = self.factors()
        svd = lowrank_svd(up, down)
        s = svd.S
        if s.numel() == 0 or float(s[0]) == 0.0:
            return FactoredDelta(self.d_out, self.d_in), 0.0
        floor = max(rtol, torch.finfo(s.dtype).eps * s.numel()) * float(s[0])
        keep = int((s > floor).sum())
        if max_rank is not None:
            keep = min(keep, max_rank)
        energy = s.double().square()
        dropped = float(energy[keep:].sum() / energy.sum())
        B, A = split_factors(svd.truncate(keep), "balanced")
        return FactoredDelta.from_factors(B.to(up.dtype), A.to(up.dtype)), dropped

    def energy(self, device: torch.device | str | None = None) -> float:
        """``||Delta||_F^2 = <up^T up, down down^T>`` from the q x q Gram matrices (float64, on
        ``device`` if given). Relative error ``~ eps * (sum of the terms' norms)^2 / ||Delta||^2``:
        use :meth:`norm` for a small difference of large terms."""
        if self.is_empty:
            return 0.0
        return product_energy(*self.factors(torch.float64, device))

    def norm(self, device: torch.device | str | None = None) -> float:
        """``||Delta||_F`` (float64, on ``device`` if given), accurate to 1e-6 relative however much
        the terms cancel (a difference of nearly equal updates).

        From the Gram matrices (:meth:`energy`) when their rounding, at most about
        ``eps q (sum_k ||up_k||_F ||down_k||_F)^2``, is below 1e-6 of the energy; otherwise as
        ``||R_up R_down^T||_F`` from thin QRs ``up = Q R_up``, ``down^T = Q' R_down``, whose
        rounding is relative to the terms' size, not to its square (about twice the Gram's cost)."""
        if self.is_empty:
            return 0.0
        up, down = self.factors(torch.float64, device)
        energy = product_energy(up, down)
        size = sum(
            float(torch.linalg.norm(u.double())) * float(torch.linalg.norm(d.double()))
            for u, d in zip(self.ups, self.downs)
        )
        if energy > 1e6 * torch.finfo(torch.float64).eps * up.shape[1] * size**2:
            return math.sqrt(energy)
        r_up = torch.linalg.qr(up, mode="r")[1]
        r_down = torch.linalg.qr(down.mT, mode="r")[1]
        return float(torch.linalg.matrix_norm(r_up @ r_down.mT))

    def inner(self, other: FactoredDelta, device: torch.device | str | None = None) -> float:
        """``<Delta, Other>_F = sum((up^T up_o) * (down down_o^T))``: a q x q_o pair of small
        products (float64, on ``device`` if given), never the dense matrices;
        ``inner(self) == energy()``."""
        if (self.d_out, self.d_in) != (other.d_out, other.d_in):
            raise ValueError(f"shapes differ: {self.d_out}x{self.d_in} and {other.d_out}x{other.d_in}")
        if self.is_empty or other.is_empty:
            return 0.0
        up, down = self.factors(torch.float64, device)
        up_o, down_o = other.factors(torch.float64, device)
        return float(((up.mT @ up_o) * (down @ down_o.mT)).sum())

    def nbytes(self, bytes_per_element: int | None = None) -> int:
        """Bytes to send the factors (``(d_out + d_in) * rank`` elements)."""
        n = 0
        for u, d in zip(self.ups, self.downs):
            size = bytes_per_element or u.element_size()
            n += (u.numel() + d.numel()) * size
        return n

    def dense(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """The dense d_out x d_in matrix (tests and small layers only)."""
        out = torch.zeros(self.d_out, self.d_in, dtype=dtype)
        for u, d in zip(self.ups, self.downs):
            out += u.to(dtype) @ d.to(dtype)
        return out

    @torch.no_grad()
    def apply_to(self, weight: Tensor, *, fan_in_fan_out: bool = False, alpha: float = 1.0) -> Tensor:
        """``weight += alpha * Delta`` in place (``Delta^T`` for ``fan_in_fan_out`` Conv1D weights).

        The update is accumulated in float32 (float64 for float64 weights) and stored in the
        weight's dtype.
        """
        expected = (self.d_in, self.d_out) if fan_in_fan_out else (self.d_out, self.d_in)
        if tuple(weight.shape) != expected:
            raise ValueError(
                f"delta {self.d_out}x{self.d_in} (fan_in_fan_out={fan_in_fan_out}) does not fit a "
                f"weight of shape {tuple(weight.shape)}"
            )
        if self.is_empty or alpha == 0.0:
            return weight
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        up, down = self.factors(acc)
        up, down = up.to(weight.device), down.to(weight.device)
        update = up @ down
        if fan_in_fan_out:
            update = update.mT
        weight.copy_((weight.to(acc) + alpha * update).to(weight.dtype))
        return weight
