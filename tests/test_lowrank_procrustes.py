"""Procrustes alignment (FedRot-LoRA's rotation) against brute force and closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.lowrank import alignment_rotation, polar, procrustes, rotate, soft_rotation
from helpers import F64, assert_close, gen, randn, random_rotation

HYP = settings(max_examples=40, deadline=None)


def rot2(theta: float) -> torch.Tensor:
    c, s = math.cos(theta), math.sin(theta)
    return torch.tensor([[c, -s], [s, c]], dtype=F64)


def assert_rotation(R: torch.Tensor, special: bool = True) -> None:
    r = R.shape[-1]
    assert torch.allclose(R.mT @ R, torch.eye(r, dtype=R.dtype), atol=1e-12)
    if special:
        assert math.isclose(float(torch.linalg.det(R)), 1.0, abs_tol=1e-12)


def test_polar_is_nearest_orthogonal():
    g = gen(0)
    X = randn(4, 4, g=g)
    P = polar(X)
    assert_rotation(P, special=False)
    best = float(torch.linalg.norm(X - P))
    for _ in range(200):
        Q = random_rotation(4, g, special=False)
        assert best <= float(torch.linalg.norm(X - Q)) + 1e-12
    # polar of an orthogonal matrix is itself; of a positive multiple too
    Q = random_rotation(3, g)
    assert_close(polar(2.5 * Q), Q, 1e-12)


@HYP
@given(r=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_procrustes_maximises_trace_over_so_r(r, seed):
    g = gen(seed)
    cross = randn(r, r, g=g)
    R = procrustes(cross)
    assert_rotation(R)
    best = float(torch.trace(R.mT @ cross))
    for _ in range(60):
        Q = random_rotation(r, g)
        assert float(torch.trace(Q.mT @ cross)) <= best + 1e-10
    # without the SO(r) constraint the optimum is over O(r): at least as good, det may be -1
    R_o = procrustes(cross, special=False)
    assert_rotation(R_o, special=False)
    assert float(torch.trace(R_o.mT @ cross)) >= best - 1e-10
    assert_close(R_o, polar(cross), 1e-10)


def test_procrustes_reflection_case():
    """A cross matrix whose O(r) optimum is a reflection: special=True must return det=+1."""
    cross = torch.diag(torch.tensor([3.0, 2.0, -1.0], dtype=F64))
    R_o = procrustes(cross, special=False)
    assert math.isclose(float(torch.linalg.det(R_o)), -1.0, abs_tol=1e-12)
    assert_close(R_o, torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=F64)), 1e-12)
    R = procrustes(cross)
    assert_rotation(R)
    assert_close(R, torch.eye(3, dtype=F64), 1e-12)  # flip the smallest singular pair


def test_alignment_rotation_so2_brute_force_grid():
    """r = 2: SO(2) is one angle; a fine grid search must not beat the closed form."""
    g = gen(3)
    for side in ("A", "B"):
        B, A = randn(13, 2, g=g), randn(2, 7, g=g)
        B_ref, A_ref = randn(13, 2, g=g), randn(2, 7, g=g)
        R = alignment_rotation(B, A, B_ref, A_ref, side, lam=1.0)
        assert_rotation(R)

        Bq, Aq = rotate(B, A, R)
        opt = float(torch.linalg.norm(Aq - A_ref if side == "A" else Bq - B_ref))
        t = torch.linspace(0, 2 * math.pi, 20001, dtype=F64)
        c, s = torch.cos(t), torch.sin(t)
        Q = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)  # (N, 2, 2)
        Bg, Ag = rotate(B, A, Q)
        grid = torch.linalg.matrix_norm(Ag - A_ref if side == "A" else Bg - B_ref)
        assert opt <= float(grid.min()) + 1e-9
        assert opt >= float(grid.min()) - 1e-4  # the grid gets close to the optimum


@pytest.mark.parametrize("side", ["A", "B"])
@pytest.mark.parametrize("r", [2, 3, 4])
def test_alignment_rotation_beats_random_rotations(side, r):
    g = gen(10 + r)
    B, A = randn(13, r, g=g), randn(r, 7, g=g)
    B_ref, A_ref = randn(13, r, g=g), randn(r, 7, g=g)
    R = alignment_rotation(B, A, B_ref, A_ref, side, lam=1.0)
    assert_rotation(R)
    Bq, Aq = rotate(B, A, R)
    assert_close(Bq @ Aq, B @ A, 1e-12)

    def dist(Bx, Ax):
        return float(torch.linalg.norm(Ax - A_ref if side == "A" else Bx - B_ref))

    best = dist(Bq, Aq)
    assert best <= dist(B, A) + 1e-12
    for _ in range(300):
        assert best <= dist(*rotate(B, A, random_rotation(r, g))) + 1e-10


def test_alignment_recovers_a_known_rotation():
    g = gen(4)
    B_ref, A_ref = randn(20, 3, g=g), randn(3, 9, g=g)
    Q = random_rotation(3, g)
    # client = reference expressed in a rotated basis: (B_ref Q, Q^T A_ref)
    B, A = B_ref @ Q, Q.mT @ A_ref
    for side in ("A", "B"):
        R = alignment_rotation(B, A, B_ref, A_ref, side)
        assert_close(R, Q.mT, 1e-12)
        Bq, Aq = rotate(B, A, R)
        assert_close(Aq, A_ref, 1e-12)
        assert_close(Bq, B_ref, 1e-12)


def test_alignment_rotation_lam_and_side():
    g = gen(5)
    B, A, B_ref, A_ref = randn(6, 3, g=g), randn(3, 11, g=g), randn(6, 3, g=g), randn(3, 11, g=g)
    assert torch.equal(alignment_rotation(B, A, B_ref, A_ref, "A", lam=0.0), torch.eye(3, dtype=F64))
    hard = alignment_rotation(B, A, B_ref, A_ref, "B", lam=1.0)
    assert_close(hard, procrustes(B.mT @ B_ref), 1e-14)
    soft = alignment_rotation(B, A, B_ref, A_ref, "B", lam=0.3)
    assert_rotation(soft)
    assert_close(soft, polar(0.7 * torch.eye(3, dtype=F64) + 0.3 * hard), 1e-12)
    with pytest.raises(ValueError, match="side"):
        alignment_rotation(B, A, B_ref, A_ref, "C")  # type: ignore[arg-type]


def test_alignment_rotation_reflections():
    """A reference that is a reflection of the client: O(r) solution has det -1, SO(r) +1."""
    g = gen(6)
    B, A = randn(9, 3, g=g), randn(3, 8, g=g)
    F = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=F64))
    B_ref, A_ref = B @ F, F @ A
    R_o = alignment_rotation(B, A, B_ref, A_ref, "A", lam=1.0, special=False)
    assert math.isclose(float(torch.linalg.det(R_o)), -1.0, abs_tol=1e-12)
    assert_close(rotate(B, A, R_o)[1], A_ref, 1e-12)
    R = alignment_rotation(B, A, B_ref, A_ref, "A", lam=1.0)
    assert_rotation(R)
    # lam < 1 always starts from the SO(r) solution, even with special=False
    soft = alignment_rotation(B, A, B_ref, A_ref, "A", lam=0.5, special=False)
    assert_rotation(soft)


@pytest.mark.parametrize("lam", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("theta", [0.3, 1.7, -2.9])
def test_soft_rotation_closed_form_so2(lam, theta):
    """polar((1-lam) I + lam R(theta)) = R(atan2(lam sin, 1 - lam + lam cos))."""
    R = soft_rotation(rot2(theta), lam)
    phi = math.atan2(lam * math.sin(theta), 1 - lam + lam * math.cos(theta))
    assert_close(R, rot2(phi), 1e-12)


def test_soft_rotation_range_check():
    with pytest.raises(ValueError, match="lam"):
        soft_rotation(torch.eye(2), 1.5)
    with pytest.raises(ValueError, match="lam"):
        soft_rotation(torch.eye(2), -0.1)


def test_rotate_preserves_product_exactly_to_rounding():
    g = gen(8)
    for r in (1, 2, 4):
        B, A = randn(32, r, g=g), randn(r, 20, g=g)
        Q = random_rotation(r, g)
        Bq, Aq = rotate(B, A, Q)
        assert torch.equal(Bq, B @ Q) and torch.equal(Aq, Q.mT @ A)
        assert_close(Bq @ Aq, B @ A, 1e-13)
