"""FedSmoothLoRA against a dense float64 reference: Gradient-Aligned init, Round-Matching, zeta schedule."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fedlora.lowrank import FactoredDelta
from fedlora.methods import ClientContext, ModuleFactors, build_method
from fedlora.methods.base import AB, ClientUpload, GlobalState
from fedlora.methods.fedsmooth_lora import zeta_at
from helpers import (
    ALPHA,
    CASES,
    F64,
    assert_close,
    declared_flags,
    dense_sum,
    gen,
    make_state,
    module_shapes,
    randn,
    scale,
    svd_truncate,
    weights_for,
)


class FakeGrad:
    """A grad_fn returning fixed random gradients and recording the offsets it was called with."""

    def __init__(self, shapes, seed=0):
        g = gen(seed)
        self.grads = {m: randn(d_out, d_in, g=g) for m, (d_out, d_in) in shapes.items()}
        self.calls: list[dict[str, FactoredDelta]] = []

    def __call__(self, offsets):
        self.calls.append(dict(offsets))
        return {m: t.clone() for m, t in self.grads.items()}


def ga_reference(G: torch.Tensor, r: int, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    d_out = G.shape[0]
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    c = d_out**0.25 / math.sqrt(gamma)
    return U[:, r : 2 * r] * c, Vh[:r] * c


def assert_equal_up_to_column_signs(X: torch.Tensor, ref: torch.Tensor, tol: float = 1e-10) -> torch.Tensor:
    """``X = ref diag(signs)``; returns the signs (singular vectors are defined up to sign)."""
    signs = torch.sign((X * ref).sum(0))
    assert bool((signs != 0).all())
    assert_close(X, ref * signs, tol)
    return signs


SMOOTH_CASES = [c for c in CASES if 2 * c.values[1] <= min(c.values[0])]


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize(("shape", "r", "n", "wmode"), SMOOTH_CASES)
def test_fedsmooth_lora_two_rounds(shape, r, n, wmode, rslora):
    shapes = module_shapes(*shape)
    gamma, zeta = 16.0, 0.7
    method = build_method("fedsmooth_lora", {"gamma": gamma, "zeta": zeta})
    s = scale(ALPHA, r, rslora)
    state = make_state(shapes, r, alpha=ALPHA, use_rslora=rslora, seed=r, zero_b=True)
    grads = [FakeGrad(shapes, seed=10 * i + 1) for i in range(n)]
    trained_g = gen(99)
    memories, uploads = [], []
    # ---- round 0: client start = (B_ga, A_ga); shift = -s B_ga A_ga; upload SVD_r(BA - B_ga A_ga)
    for i in range(n):
        ctx = ClientContext(f"c{i}", 0, r, grad_fn=grads[i])
        start = method.client_start(state, ctx)
        assert start.report == {}  # no Round-Matching term in round 0
        assert len(grads[i].calls) == 1 and grads[i].calls[0] == {}
        assert start.trainable == AB and start.upload == AB
        trained = {}
        for m in shapes:
            B_ref, A_ref = ga_reference(grads[i].grads[m], r, gamma)
            f = start.factors[m]
            signs_b = assert_equal_up_to_column_signs(f.B, B_ref)
            signs_a = assert_equal_up_to_column_signs(f.A.mT, A_ref.mT)
            W_ga = (B_ref * signs_b) @ (A_ref * signs_a.unsqueeze(1))
            assert_close(start.local_shift[m].dense(), -s * W_ga, 1e-12, "local shift")
            trained[m] = ModuleFactors(
                A=f.A + 0.1 * randn(*f.A.shape, g=trained_g), B=f.B + randn(*f.B.shape, g=trained_g)
            )
        up, mem = method.client_finish(state, ctx, start, trained)
        assert int(mem["round"]) == 0
        dropped = total = 0.0
        for m in shapes:
            W_ga = -start.local_shift[m].dense() / s
            Y = trained[m].B @ trained[m].A - W_ga
            ref = svd_truncate(Y, r)
            assert_close(up[m].B @ up[m].A, ref, 1e-9, "upload = SVD_r(BA - W_ga)")
            dropped, total = dropped + float((Y - ref).pow(2).sum()), total + float(Y.pow(2).sum())
        assert start.report["upload_dropped"] == pytest.approx(math.sqrt(dropped / total), rel=1e-8, abs=1e-12)
        for m in shapes:
            assert up[m].B.shape[1] == r
            assert torch.equal(mem[f"{m}.A"], up[m].A) and torch.equal(mem[f"{m}.B"], up[m].B)
        memories.append(mem)
        uploads.append(ClientUpload(f"c{i}", up, num_examples=10 + 7 * i))
    wargs, p = weights_for(uploads, wmode)
    res = method.aggregate(state, uploads, wargs)
    for m, (d_out, d_in) in shapes.items():
        M = dense_sum(uploads, m, p)
        assert_close(res.backbone_delta[m].dense(), s * svd_truncate(M, r), 1e-9, "merge s SVD_r(M)")
        f = res.state.factors[m]
        assert torch.equal(f.A, torch.zeros(r, d_in, dtype=F64)) and torch.equal(f.B, torch.zeros(d_out, r, dtype=F64))
        ms = res.state.method_state
        assert_close(ms[f"{m}.Bs"] @ ms[f"{m}.As"], svd_truncate(M, r), 1e-9)
    assert res.bytes_down == sum(d.nbytes() for d in res.backbone_delta.values())
    # ---- round 1: Round-Matching W_rm = zeta (B_c A_c - B_s A_s); grad at W + s W_rm
    state1 = res.state
    for i in range(n):
        ctx = ClientContext(f"c{i}", 1, r, memory=memories[i], grad_fn=grads[i])
        start = method.client_start(state1, ctx)
        offsets = grads[i].calls[-1]
        assert set(offsets) == set(shapes)
        dropped = rm_energy = 0.0
        for m in shapes:
            Bs, As = state1.method_state[f"{m}.Bs"], state1.method_state[f"{m}.As"]
            W_rm = zeta * (memories[i][f"{m}.B"] @ memories[i][f"{m}.A"] - Bs @ As)
            scale_rm = s * zeta * float((memories[i][f"{m}.B"] @ memories[i][f"{m}.A"]).norm())
            assert_close(offsets[m].dense(), s * W_rm, 1e-12, "grad_fn offsets = s W_rm", scale=scale_rm)
            B_ref, A_ref = ga_reference(grads[i].grads[m], r, gamma)
            W_ga = -start.local_shift[m].dense() / s
            # the shift is -s B_ga A_ga with the gradient's singular vectors (up to their signs)
            B_sh = start.local_shift[m].ups[0] / (-s)
            A_sh = start.local_shift[m].downs[0]
            assert_equal_up_to_column_signs(B_sh, B_ref)
            assert_equal_up_to_column_signs(A_sh.mT, A_ref.mT)
            f = start.factors[m]
            assert f.B.shape == (shapes[m][0], r) and f.A.shape == (r, shapes[m][1])
            assert_close(f.B @ f.A, svd_truncate(W_ga + W_rm, r), 1e-9, "init = SVD_r(W_ga + W_rm)")
            dropped += float((W_ga + W_rm - svd_truncate(W_ga + W_rm, r)).pow(2).sum())
            rm_energy += float(W_rm.pow(2).sum())
        # the share of the Round-Matching term the rank-r init loses, pooled over modules (one
        # client: its upload is the aggregate, W_rm = 0 and there is nothing to report)
        if n > 1:
            assert start.report["rm_dropped"] == pytest.approx(math.sqrt(dropped / rm_energy), rel=1e-8, abs=1e-12)


def test_fedsmooth_lora_stale_memory_and_decay():
    shapes = module_shapes(32, 20)
    r, s = 2, scale(ALPHA, 2)
    T = 10
    method = build_method("fedsmooth_lora", {"zeta_mode": "decay", "zeta": 1.0, "zeta_min": 0.2})
    state = make_state(shapes, r, alpha=ALPHA, round_=0, seed=0, zero_b=True)
    grad = FakeGrad(shapes, seed=3)
    ctx = ClientContext("c", 0, r, num_rounds=T, grad_fn=grad)
    start = method.client_start(state, ctx)
    g = gen(5)
    trained = {
        m: ModuleFactors(A=f.A + randn(*f.A.shape, g=g), B=f.B + randn(*f.B.shape, g=g))
        for m, f in start.factors.items()
    }
    up, mem = method.client_finish(state, ctx, start, trained)
    res = method.aggregate(state, [ClientUpload("c", up, 3), ClientUpload("d", trained, 1)])
    # next round with memory from round 0: offsets scaled by zeta_1 of the cosine decay
    method.client_start(res.state, ClientContext("c", 1, r, num_rounds=T, memory=mem, grad_fn=grad))
    z1 = 0.2 + 0.5 * 0.8 * (1 + math.cos(math.pi * 1 / T))
    for m in shapes:
        ms = res.state.method_state
        ref = s * z1 * (mem[f"{m}.B"] @ mem[f"{m}.A"] - ms[f"{m}.Bs"] @ ms[f"{m}.As"])
        assert_close(grad.calls[-1][m].dense(), ref, 1e-12)
    # a client whose memory is older than the previous round restarts without Round-Matching
    later = GlobalState(3, res.state.factors, res.state.spec, res.state.method_state)
    start3 = method.client_start(later, ClientContext("c", 3, r, num_rounds=T, memory=mem, grad_fn=grad))
    assert grad.calls[-1] == {}
    for m in shapes:
        B_ref, A_ref = ga_reference(grad.grads[m], r, 64.0)
        assert_equal_up_to_column_signs(start3.factors[m].B, B_ref)
        assert_equal_up_to_column_signs(start3.factors[m].A.mT, A_ref.mT)
    # decay needs the number of rounds
    with pytest.raises(ValueError, match="rounds"):
        method.client_start(res.state, ClientContext("c", 1, r, memory=mem, grad_fn=grad))


def test_zeta_schedule_values():
    assert zeta_at(5, 10, "constant", 0.8, 0.1) == 0.8
    assert zeta_at(5, None, "constant", 0.8, 0.1) == 0.8
    assert zeta_at(0, 10, "decay", 1.0, 0.5) == pytest.approx(1.0)
    assert zeta_at(5, 10, "decay", 1.0, 0.5) == pytest.approx(0.75)
    assert zeta_at(10, 10, "decay", 1.0, 0.5) == pytest.approx(0.5)
    assert zeta_at(2, 8, "decay", 1.0, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    vals = [zeta_at(t, 20, "decay", 1.0, 0.0) for t in range(21)]
    assert all(a >= b for a, b in itertools.pairwise(vals))  # monotone
    with pytest.raises(ValueError):
        zeta_at(1, None, "decay", 1.0, 0.5)
    with pytest.raises(ValueError):
        zeta_at(1, 0, "decay", 1.0, 0.5)


def test_fedsmooth_lora_errors_and_lowrank_gradient_svd():
    shapes = {"m": (6, 11)}
    method = build_method("fedsmooth_lora")
    state = make_state(shapes, 4, zero_b=True)  # 2r = 8 > 6
    with pytest.raises(ValueError, match="2r"):
        method.client_start(state, ClientContext("c", 0, 4, grad_fn=FakeGrad(shapes)))
    state2 = make_state(shapes, 2, zero_b=True)
    with pytest.raises(ValueError, match="grad_fn"):
        method.client_start(state2, ClientContext("c", 0, 2))
    # an exactly low-rank gradient: the randomized SVD finds the same singular vectors
    shapes = {"m": (32, 20)}
    g = gen(1)
    U, _ = torch.linalg.qr(randn(32, 6, g=g))
    V, _ = torch.linalg.qr(randn(20, 6, g=g))
    G = (U * torch.tensor([9.0, 7.0, 5.0, 3.0, 2.0, 1.0], dtype=F64)) @ V.mT
    fake = FakeGrad(shapes)
    fake.grads["m"] = G
    state3 = make_state(shapes, 2, zero_b=True)
    low = build_method("fedsmooth_lora", {"ga_svd": "lowrank", "ga_niter": 6})
    start = low.client_start(state3, ClientContext("c", 0, 2, grad_fn=fake))
    B_ref, A_ref = ga_reference(G, 2, 64.0)
    assert_equal_up_to_column_signs(start.factors["m"].B, B_ref, 1e-8)
    assert_equal_up_to_column_signs(start.factors["m"].A.mT, A_ref.mT, 1e-8)


def test_fedsmooth_lora_declared_flags():
    """The capabilities FedSmoothLoRA declares, which the conformance suite checks it against."""
    assert declared_flags("fedsmooth_lora") == {"changes_backbone", "needs_gradient"}
