"""Orthogonal Procrustes alignment of LoRA factors (FedRot-LoRA).

For any orthogonal ``R`` (r x r), ``(B R)(R^T A) = B A``: a LoRA product is invariant under a
rotation of its latent basis. Aligning a client's factors to a reference frame before factor
averaging therefore changes nothing the client computed, only how averaging combines clients.

- A-side: ``R = argmin_{R^T R = I} ||R^T A - A_ref||_F``  ->  ``A A_ref^T = U S V^T``, ``R = U V^T``.
- B-side: ``R = argmin_{R^T R = I} ||B R - B_ref||_F``    ->  ``B^T B_ref = U S V^T``, ``R = U V^T``.
- SO(r) projection: if ``det(R) < 0`` flip the sign of the last singular pair (``V^T[-1]``).
- Soft rotation with weight ``lam``: ``R_lam = polar((1 - lam) I + lam R)``, where
  ``polar(X) = U' V'^T`` for ``X = U' S' V'^T``. ``lam = 0`` is the identity (FedIT),
  ``lam = 1`` the SO(r) solution.

Every step works on r x r matrices; cost O(r^2 d) for the cross product plus O(r^3).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Side = Literal["A", "B"]


def polar(x: Tensor) -> Tensor:
    """The orthogonal polar factor ``U V^T`` of ``x = U S V^T`` (nearest orthogonal matrix)."""
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def procrustes(cross: Tensor, *, special: bool = True) -> Tensor:
    """``R = U V^T`` maximising ``tr(R^T cross)`` over orthogonal R (over SO(r) if ``special``).

    ``cross`` is the r x r matrix ``A A_ref^T`` (A-side) or ``B^T B_ref`` (B-side).
    """
    u, _, vh = torch.linalg.svd(cross, full_matrices=False)
    if special:
        det = torch.linalg.det(u @ vh)
        if det < 0:
            vh = vh.clone()
            vh[..., -1, :] = -vh[..., -1, :]
    return u @ vh


def soft_rotation(rotation: Tensor, lam: float) -> Tensor:
    """``polar((1 - lam) I + lam R)``: a rotation part-way from the identity towards ``R``."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must lie in [0, 1], got {lam}")
    eye = torch.eye(rotation.shape[-1], dtype=rotation.dtype, device=rotation.device)
    if lam == 1.0:
        return rotation
    if lam == 0.0:
        return eye
    return polar((1.0 - lam) * eye + lam * rotation)


def alignment_rotation(
    B: Tensor, A: Tensor, B_ref: Tensor, A_ref: Tensor, side: Side, *, lam: float = 1.0, special: bool = True
) -> Tensor:
    """The rotation that aligns the ``side`` factor of ``(B, A)`` to the reference.

    With ``lam < 1`` the SO(r) solution is always used before blending (as the authors' soft
    variant does); ``special=False`` with ``lam = 1`` gives the plain O(r) solution.
    """
    if side == "A":
        cross = A @ A_ref.mT
    elif side == "B":
        cross = B.mT @ B_ref
    else:
        raise ValueError(f"side must be 'A' or 'B', got {side!r}")
    rot = procrustes(cross, special=special or lam < 1.0)
    return soft_rotation(rot, lam)


def rotate(B: Tensor, A: Tensor, rotation: Tensor) -> tuple[Tensor, Tensor]:
    """``(B R, R^T A)``: the same product in the rotated basis."""
    return B @ rotation, rotation.mT @ A
