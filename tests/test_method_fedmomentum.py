"""FedMomentum against a dense float64 reference: SVD_r of the exact aggregate, energy band, deferred merges."""

from __future__ import annotations

import math

import pytest
import torch

from fedlora.methods import build_method
from helpers import (
    ALPHA,
    CASES,
    F64,
    assert_close,
    build,
    declared_flags,
    dense_sum,
    function_of,
    make_state,
    make_uploads,
    module_shapes,
    scale,
    svd_truncate,
    weights_for,
)


def brute_energy_rank(S: torch.Tensor, tau: float) -> int:
    e = (S**2).tolist()
    total = math.fsum(e)
    for k in range(len(e) + 1):
        if math.fsum(e[:k]) >= tau * total:
            return k
    raise AssertionError


@pytest.mark.parametrize("split", ["balanced", "left", "right"])
@pytest.mark.parametrize(("shape", "r", "n", "wmode"), CASES)
def test_fedmomentum_tau1_exact(shape, r, n, wmode, split):
    state, uploads, wargs, p = build(shape, r, n, wmode)
    s = scale(ALPHA, r)
    res = build_method("fedmomentum", {"tau": "1.0", "split": split}).aggregate(state, uploads, wargs)
    for m, (d_out, d_in) in state.shapes().items():
        M = dense_sum(uploads, m, p)
        f = res.state.factors[m]
        assert f.B.shape == (d_out, r) and f.A.shape == (r, d_in)
        # the LoRA is the best rank-r approximation of M (dense SVD truncation)
        assert_close(f.B @ f.A, svd_truncate(M, r), 1e-9, "SVD_r(M)")
        S = torch.linalg.svdvals(M)
        if split == "balanced":
            assert_close(f.B.mT @ f.B, torch.diag(S[:r]), 1e-10, "B^T B")
            assert_close(f.A @ f.A.mT, torch.diag(S[:r]), 1e-10, "A A^T")
        elif split == "left":
            assert_close(f.A @ f.A.mT, torch.eye(r, dtype=F64), 1e-10)
        else:
            assert_close(f.B.mT @ f.B, torch.eye(r, dtype=F64), 1e-10)
        # residual band r..rank(M) in the backbone, with the LoRA scale applied
        assert_close(
            res.backbone_delta[m].dense(), s * (M - svd_truncate(M, r)), 1e-9, "residual", scale=s * float(M.norm())
        )
        assert res.backbone_delta[m].rank == max(0, min(n * r, d_out, d_in) - r)
        # tau = 1: exactly W + s sum_i p_i B_i A_i
        assert_close(function_of(res, s, m), s * M, 1e-10, "function")
        assert res.report[m]["dropped_energy"] <= 1e-20
        assert res.report[m]["lora_energy"] == pytest.approx(float((S[:r] ** 2).sum() / (S**2).sum()), rel=1e-10)


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("tau", [0.0, 0.5, 0.9, 0.99])
@pytest.mark.parametrize(("shape", "r"), [((32, 20), 1), ((32, 20), 2), ((13, 7), 1), ((6, 11), 2)])
def test_fedmomentum_energy_truncation(shape, r, tau, rslora):
    state, uploads, wargs, p = build(shape, r, 5, "explicit", rslora=rslora)
    s = scale(ALPHA, r, rslora)
    res = build_method("fedmomentum", {"tau": tau, "energy": "aggregate"}).aggregate(state, uploads, wargs)
    for m in state.factors:
        M = dense_sum(uploads, m, p)
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        r_eff = brute_energy_rank(S, tau)
        assert res.report[m]["r_eff"] == r_eff
        hi = max(r, r_eff)
        band = (U[:, r:hi] * S[r:hi]) @ Vh[r:hi]
        assert_close(res.backbone_delta[m].dense(), s * band, 1e-9, "residual band", scale=s * float(M.norm()))
        assert res.backbone_delta[m].rank == hi - r
        f = res.state.factors[m]
        assert_close(f.B @ f.A, svd_truncate(M, r), 1e-9)  # top r kept even when r_eff < r
        dropped = s * M - function_of(res, s, m)
        assert_close(dropped, s * (M - svd_truncate(M, hi)), 1e-9, "dropped components", scale=s * float(M.norm()))
        frac = float((dropped**2).sum() / (s * M).pow(2).sum())
        assert frac <= (1 - tau) + 1e-12
        assert res.report[m]["dropped_energy"] == pytest.approx(frac, rel=1e-8, abs=1e-14)


@pytest.mark.parametrize("tau", [0.0, 0.5, 0.9, 0.99, 0.999])
@pytest.mark.parametrize(("shape", "r"), [((32, 20), 1), ((32, 20), 2), ((13, 7), 1), ((6, 11), 2)])
def test_fedmomentum_energy_over_the_rounds_change(shape, r, tau):
    """energy: change (the default): the dropped tail is at most (1 - tau) of ||M - B^t A^t||^2,
    the energy of what the round changed, against a dense float64 reference."""
    state, uploads, wargs, p = build(shape, r, 5, "explicit")
    s = scale(ALPHA, r)
    res = build_method("fedmomentum", {"tau": tau}).aggregate(state, uploads, wargs)
    for m, start in state.factors.items():
        M = dense_sum(uploads, m, p)
        change = float(((M - start.B.double() @ start.A.double()) ** 2).sum())
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        e = [float(x) ** 2 for x in S]
        r_eff = next(k for k in range(len(e) + 1) if math.fsum(e[k:]) <= (1 - tau) * change)
        assert res.report[m]["r_eff"] == r_eff
        hi = max(r, r_eff)
        assert res.backbone_delta[m].rank == hi - r
        band = (U[:, r:hi] * S[r:hi]) @ Vh[r:hi]
        assert_close(res.backbone_delta[m].dense(), s * band, 1e-9, "residual band", scale=s * float(M.norm()))
        dropped = M - svd_truncate(M, hi)
        assert float((dropped**2).sum()) <= (1 - tau) * change * (1 + 1e-9) + 1e-24
        assert res.report[m]["dropped_of_change"] == pytest.approx(
            float((dropped**2).sum()) / change, rel=1e-7, abs=1e-14
        )


def test_the_change_rule_keeps_at_least_what_the_aggregate_rule_keeps_when_clients_start_near_the_global():
    """Clients that each took their own step from the global factors: the aggregate's energy is mostly the
    global LoRA, so the rule over M merges nothing while the rule over the change keeps a residual."""
    state, uploads, wargs, p = build((32, 20), 2, 5, "explicit")
    g = torch.Generator().manual_seed(3)
    near = []
    for u in uploads:  # each client = the global factors + its own step
        fs = {}
        for m, f in u.factors.items():
            start = state.factors[m]
            fs[m] = type(f)(
                A=start.A + 0.5 * torch.randn(start.A.shape, generator=g, dtype=start.A.dtype),
                B=start.B + 0.5 * torch.randn(start.B.shape, generator=g, dtype=start.B.dtype),
            )
        near.append(type(u)(**{**u.__dict__, "factors": fs}))
    over_m = build_method("fedmomentum", {"tau": 0.99, "energy": "aggregate"}).aggregate(state, near, wargs)
    over_change = build_method("fedmomentum", {"tau": 0.99}).aggregate(state, near, wargs)
    for m in state.factors:
        assert over_m.report[m]["residual_rank"] == 0 and over_m.report[m]["dropped_of_change"] > 0.02
        assert over_change.report[m]["residual_rank"] > 0
        assert over_change.report[m]["dropped_of_change"] <= 0.01 + 1e-12


def test_fedmomentum_precision_float32():
    state, uploads, wargs, p = build((32, 20), 2, 5, "samples")
    res = build_method("fedmomentum", {"tau": 1.0, "precision": "float32"}).aggregate(state, uploads, wargs)
    s = scale(ALPHA, 2)
    for m in state.factors:
        f = res.state.factors[m]
        assert f.B.dtype == torch.float32 and f.A.dtype == torch.float32
        assert_close(function_of(res, s, m), s * dense_sum(uploads, m, p), 1e-5)


@pytest.mark.parametrize("k", [2, 3])
def test_fedmomentum_merge_every_keeps_residuals_pending(k):
    shapes = module_shapes(13, 7)
    r, s = 2, scale(ALPHA, 2)
    method = build_method("fedmomentum", {"tau": 1.0, "merge_every": k})
    state = make_state(shapes, r, alpha=ALPHA, seed=3)
    accumulated = {m: torch.zeros(d_out, d_in, dtype=F64) for m, (d_out, d_in) in shapes.items()}
    for t in range(2 * k):
        uploads = make_uploads(shapes, [r] * 3, seed=100 + t)
        _, p = weights_for(uploads, "samples")
        res = method.aggregate(state, uploads)
        for m in shapes:
            M = dense_sum(uploads, m, p)
            accumulated[m] += s * (M - svd_truncate(M, r))
        if (t + 1) % k == 0:
            # the k-th round merges exactly the accumulated residual and clears the state
            assert set(res.backbone_delta) == set(shapes)
            for m in shapes:
                assert_close(res.backbone_delta[m].dense(), accumulated[m], 1e-9, f"merged at round {t}")
                accumulated[m].zero_()
            assert res.state.method_state == {}
        else:
            assert res.backbone_delta == {}
            pending = res.state.method_state
            assert set(pending) == {f"{m}.pending_{x}" for m in shapes for x in ("up", "down")}
            for m in shapes:
                assert_close(pending[f"{m}.pending_up"] @ pending[f"{m}.pending_down"], accumulated[m], 1e-9)
            # bytes down carry only the LoRA until the merge
            assert res.bytes_down == sum(f.nbytes() for f in res.state.factors.values())
        state = res.state
    final_state, flushed = method.finalize(state)
    assert flushed == {}


def test_fedmomentum_merge_every_zero_flushes_at_finalize():
    shapes = module_shapes(6, 11)
    r, s = 1, scale(ALPHA, 1)
    method = build_method("fedmomentum", {"tau": 1.0, "merge_every": 0})
    state = make_state(shapes, r, alpha=ALPHA, seed=4)
    accumulated = {m: torch.zeros(d_out, d_in, dtype=F64) for m, (d_out, d_in) in shapes.items()}
    for t in range(4):
        uploads = make_uploads(shapes, [r] * 2, seed=200 + t)
        _, p = weights_for(uploads, "samples")
        res = method.aggregate(state, uploads)
        assert res.backbone_delta == {}
        for m in shapes:
            M = dense_sum(uploads, m, p)
            accumulated[m] += s * (M - svd_truncate(M, r))
        state = res.state
    # the pending sum is re-compressed: its rank is bounded by the shape, not the rounds
    for m, (d_out, d_in) in shapes.items():
        assert state.method_state[f"{m}.pending_up"].shape[1] <= min(d_out, d_in)
    final_state, flushed = method.finalize(state)
    assert final_state.method_state == {} and final_state.round == state.round
    assert final_state.factors is state.factors
    for m in shapes:
        assert_close(flushed[m].dense(), accumulated[m], 1e-9)
    _, again = method.finalize(final_state)
    assert again == {}


def test_fedmomentum_declared_flags():
    """The capabilities FedMomentum declares, which the conformance suite checks it against."""
    assert declared_flags("fedmomentum") == {"changes_backbone"}
