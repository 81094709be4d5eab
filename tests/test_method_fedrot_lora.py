"""FedRot-LoRA against a dense float64 reference: clients Procrustes-rotated to the global frame, then averaged."""

from __future__ import annotations

import math

import pytest
import torch

from fedlora.methods import ModuleFactors, build_method
from fedlora.methods.base import ClientUpload, GlobalState
from helpers import (
    CASES,
    F64,
    assert_close,
    build,
    declared_flags,
    dense_mean,
    gen,
    make_state,
    randn,
    random_rotation,
    rel_err,
)


def kabsch(cross: torch.Tensor) -> torch.Tensor:
    """argmax_{R in SO(r)} tr(R^T cross), written independently: U diag(1, .., det) V^T."""
    U, _, Vh = torch.linalg.svd(cross)
    d = torch.sign(torch.linalg.det(U @ Vh))
    D = torch.eye(cross.shape[0], dtype=cross.dtype)
    D[-1, -1] = d
    return U @ D @ Vh


def soft(R: torch.Tensor, lam: float) -> torch.Tensor:
    eye = torch.eye(R.shape[0], dtype=R.dtype)
    X = (1 - lam) * eye + lam * R
    U, _, Vh = torch.linalg.svd(X)
    return U @ Vh


@pytest.mark.parametrize("round_", [0, 1, 2, 3])
@pytest.mark.parametrize(("shape", "r", "n", "wmode"), CASES)
def test_fedrot_lam0_is_fedit(shape, r, n, wmode, round_):
    state, uploads, wargs, _ = build(shape, r, n, wmode, round_=round_)
    rot = build_method("fedrot_lora", {"lam": 0.0}).aggregate(state, uploads, wargs)
    fedit = build_method("fedit").aggregate(state, uploads, wargs)
    for m in state.factors:
        assert torch.equal(rot.state.factors[m].A, fedit.state.factors[m].A)
        assert torch.equal(rot.state.factors[m].B, fedit.state.factors[m].B)
    assert rot.backbone_delta == {}


@pytest.mark.parametrize("lam", [0.3, 1.0])
@pytest.mark.parametrize("round_", [0, 1, 2])
@pytest.mark.parametrize(("shape", "r", "n", "wmode"), CASES)
def test_fedrot_reference(shape, r, n, wmode, round_, lam):
    state, uploads, wargs, p = build(shape, r, n, wmode, round_=round_)
    res = build_method("fedrot_lora", {"lam": lam}).aggregate(state, uploads, wargs)
    for m, ref in state.factors.items():
        Bs, As = [], []
        for u in uploads:
            B, A = u.factors[m].B, u.factors[m].A
            if round_ == 0:  # skipped
                R = torch.eye(r, dtype=F64)
            elif round_ % 2 == 1:  # A-round
                R = soft(kabsch(A @ ref.A.mT), lam)
            else:  # B-round
                R = soft(kabsch(B.mT @ ref.B), lam)
            Bs.append(B @ R)
            As.append(R.mT @ A)
        f = res.state.factors[m]
        assert_close(f.B, dense_mean(Bs, p), 1e-10, "rotated B mean")
        assert_close(f.A, dense_mean(As, p), 1e-10, "rotated A mean")
    assert res.bytes_down == sum(f.nbytes() for f in res.state.factors.values())


@pytest.mark.parametrize("round_", [1, 2])
@pytest.mark.parametrize("r", [2, 4])
def test_fedrot_hard_rotation_is_procrustes_optimum(r, round_):
    """One client, lam = 1: the new global factors are the client's, rotated by the SO(r)
    Procrustes solution: same product, det +1, closer to the reference than any rotation."""
    state, uploads, _, _ = build((32, 20), r, 1, "samples", round_=round_)
    res = build_method("fedrot_lora", {"lam": 1.0}).aggregate(state, uploads)
    side = "A" if round_ % 2 == 1 else "B"
    g = gen(r)
    for m, ref in state.factors.items():
        B, A = uploads[0].factors[m].B, uploads[0].factors[m].A
        f = res.state.factors[m]
        assert_close(f.B @ f.A, B @ A, 1e-12, "product preserved")
        R = torch.linalg.lstsq(B, f.B).solution  # B R = B~
        assert_close(R.mT @ R, torch.eye(r, dtype=F64), 1e-10)
        assert math.isclose(float(torch.linalg.det(R)), 1.0, abs_tol=1e-10)
        assert_close(f.A, R.mT @ A, 1e-10)

        def dist(Bx, Ax, side=side, ref=ref):
            return float(torch.linalg.norm(Ax - ref.A if side == "A" else Bx - ref.B))

        best = dist(f.B, f.A)
        assert best <= dist(B, A) + 1e-12
        for _ in range(200):
            Q = random_rotation(r, g)
            assert best <= dist(B @ Q, Q.mT @ A) + 1e-10


def test_fedrot_reflections_and_fixed_side():
    r = 3
    shapes = {"m": (13, 7)}
    state = make_state(shapes, r, round_=1, seed=9)
    g = gen(9)
    F = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=F64))
    ref = state.factors["m"]
    # the client is the reference reflected (+ noise); the best O(r) map is a reflection
    B = ref.B @ F + 1e-3 * randn(13, r, g=g)
    A = F @ ref.A + 1e-3 * randn(r, 7, g=g)
    up = [ClientUpload("c", {"m": ModuleFactors(A=A, B=B)}, 10)]
    hard_o = build_method("fedrot_lora", {"lam": 1.0, "reflections": True}).aggregate(state, up)
    hard_so = build_method("fedrot_lora", {"lam": 1.0}).aggregate(state, up)
    R_o = torch.linalg.lstsq(A.mT, hard_o.state.factors["m"].A.mT).solution  # A~ = R^T A
    R_so = torch.linalg.lstsq(A.mT, hard_so.state.factors["m"].A.mT).solution
    assert float(torch.linalg.det(R_o)) == pytest.approx(-1.0, abs=1e-9)
    assert float(torch.linalg.det(R_so)) == pytest.approx(1.0, abs=1e-9)
    assert rel_err(hard_o.state.factors["m"].A, ref.A) < 1e-2
    # align = "B" aligns B in an odd round too; align = "A" in an even round
    for align, round_ in (("B", 1), ("A", 2)):
        st = GlobalState(round_, state.factors, state.spec)
        res = build_method("fedrot_lora", {"lam": 1.0, "align": align}).aggregate(st, up)
        Rx = kabsch(B.mT @ ref.B) if align == "B" else kabsch(A @ ref.A.mT)
        assert_close(res.state.factors["m"].B, B @ Rx, 1e-10)
    # skip_first = false aligns B already in round 0
    st0 = GlobalState(0, state.factors, state.spec)
    res0 = build_method("fedrot_lora", {"lam": 1.0, "skip_first": "false"}).aggregate(st0, up)
    assert_close(res0.state.factors["m"].B, B @ kabsch(B.mT @ ref.B), 1e-10)


def test_fedrot_needs_global():
    m = build_method("fedrot_lora")
    assert not m.needs_global(0) and m.needs_global(1) and m.needs_global(2)
    assert build_method("fedrot_lora", {"skip_first": False}).needs_global(0)
    assert not build_method("fedit").needs_global(1)


def test_fedrot_lora_declared_flags():
    """The capabilities FedRot-LoRA declares, which the conformance suite checks it against."""
    assert declared_flags("fedrot_lora") == set()
