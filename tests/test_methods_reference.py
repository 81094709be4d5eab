"""Every method against a dense float64 reference computed independently here.

Factors are random, non-square and non-symmetric; shapes, ranks, client counts and (unequal)
weights vary. "Function" means the global update of a module after the round: the backbone
delta plus ``s B A`` with the new global factors.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fedlora.lowrank import FactoredDelta
from fedlora.methods import ClientContext, ModuleFactors, build_method
from fedlora.methods.base import AB, ClientUpload, GlobalState, LoRASpec
from fedlora.methods.fedsmooth_lora import zeta_at
from fedlora.methods.flora import fresh_lora
from helpers import (
    CLIENTS,
    F64,
    RANKS,
    SHAPES,
    assert_close,
    dense_mean,
    dense_sum,
    function_of,
    gen,
    make_state,
    make_uploads,
    module_shapes,
    randn,
    random_rotation,
    rel_err,
    scale,
    svd_truncate,
    weights_for,
)

CASES = [
    pytest.param(shape, r, n, w, id=f"{shape[0]}x{shape[1]}-r{r}-n{n}-{w}")
    for shape in SHAPES
    for r in RANKS
    for n in CLIENTS
    for w in ("samples", "explicit")
]
ALPHA = 3.0  # != r for every rank used: s != 1


def build(shape, r, n, wmode, *, round_=1, ranks=None, only=None, rslora=False, alpha=ALPHA):
    seed = shape[0] * 1000 + r * 100 + n * 10 + (wmode == "explicit") + 7 * round_
    shapes = module_shapes(*shape)
    state = make_state(shapes, r, alpha=alpha, use_rslora=rslora, round_=round_, seed=seed)
    uploads = make_uploads(shapes, ranks if ranks is not None else [r] * n, seed=seed + 1, only=only)
    wargs, p = weights_for(uploads, wmode, seed=seed + 2)
    return state, uploads, wargs, p


def test_weights_are_normalised_sample_counts_or_explicit():
    """The weights the reference uses are the ones the methods use."""
    from fedlora.methods.base import aggregation_weights

    state, uploads, _, p = build((13, 7), 2, 5, "samples")
    assert aggregation_weights(uploads) == pytest.approx(p, rel=1e-15)
    assert len(set(u.num_examples for u in uploads)) > 1  # unequal
    assert aggregation_weights(uploads, [1, 3, 0, 0, 4]) == pytest.approx([1 / 8, 3 / 8, 0, 0, 4 / 8])
    with pytest.raises(ValueError):
        aggregation_weights(uploads, [1, 2])
    with pytest.raises(ValueError):
        aggregation_weights(uploads, [0, 0, 0, 0, 0])
    with pytest.raises(ValueError):
        aggregation_weights(uploads, [1, -1, 1, 1, 1])
    with pytest.raises(ValueError):
        aggregation_weights(uploads, [1, float("nan"), 1, 1, 1])


# ---- FedIT / FedEx-LoRA ------------------------------------------------------------------------
@pytest.mark.parametrize(("shape", "r", "n", "wmode"), CASES)
def test_fedit(shape, r, n, wmode):
    state, uploads, wargs, p = build(shape, r, n, wmode)
    res = build_method("fedit").aggregate(state, uploads, wargs)
    s = scale(ALPHA, r)
    assert res.state.round == state.round + 1
    assert res.backbone_delta == {}
    for m in state.factors:
        f = res.state.factors[m]
        assert_close(f.B, dense_mean([u.factors[m].B for u in uploads], p), 1e-13, "B mean")
        assert_close(f.A, dense_mean([u.factors[m].A for u in uploads], p), 1e-13, "A mean")
        assert_close(function_of(res, s, m), s * f.B @ f.A, 1e-15)
        if n > 1:  # FedIT is inexact: the product of means is not the mean of products
            assert rel_err(f.B @ f.A, dense_sum(uploads, m, p)) > 1e-3


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize(("shape", "r", "n", "wmode"), CASES)
def test_fedex_lora(shape, r, n, wmode, rslora):
    state, uploads, wargs, p = build(shape, r, n, wmode, rslora=rslora)
    s = scale(ALPHA, r, rslora)
    res = build_method("fedex_lora").aggregate(state, uploads, wargs)
    fedit = build_method("fedit").aggregate(state, uploads, wargs)
    raw = build_method("fedex_lora", {"compress": "false"}).aggregate(state, uploads, wargs)
    for m, (d_out, d_in) in state.shapes().items():
        f = res.state.factors[m]
        # clients restart from the factor averages
        assert torch.equal(f.A, fedit.state.factors[m].A) and torch.equal(f.B, fedit.state.factors[m].B)
        M = dense_sum(uploads, m, p)
        Bbar, Abar = dense_mean([u.factors[m].B for u in uploads], p), dense_mean([u.factors[m].A for u in uploads], p)
        delta = res.backbone_delta[m]
        assert (delta.d_out, delta.d_in) == (d_out, d_in)
        assert_close(delta.dense(), s * (M - Bbar @ Abar), 1e-10, "residual", scale=s * float(M.norm()))
        # exact: W + s B_bar A_bar + s Res = W + s sum p_i B_i A_i
        assert_close(function_of(res, s, m), s * M, 1e-10, "function")
        # uncompressed: the residual factored as [p_i (B_i - B_bar)]_{i != k} @ [A_i - A_k], rank (n - 1) r
        assert raw.backbone_delta[m].rank == (n - 1) * r
        assert_close(raw.backbone_delta[m].dense(), s * (M - Bbar @ Abar), 1e-10, scale=s * float(M.norm()))
        # compressed to the numerical rank: Res = sum_i p_i (B_i - B_bar)(A_i - A_bar) has rank
        # (n - 1) r; one client has no residual at all
        true_rank = min((n - 1) * r, d_out, d_in)
        assert delta.rank == true_rank
        assert res.report[m]["residual_rank"] == true_rank
    assert res.bytes_down <= raw.bytes_down


# ---- FedMomentum --------------------------------------------------------------------------------
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
    res = build_method("fedmomentum", {"tau": tau}).aggregate(state, uploads, wargs)
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


# ---- FedRot-LoRA ------------------------------------------------------------------------------
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


# ---- FFA-LoRA / RoLoRA / FedSA-LoRA -------------------------------------------------------------------
@pytest.mark.parametrize(("shape", "r", "n", "wmode"), CASES)
def test_ffa_lora(shape, r, n, wmode):
    state, uploads, wargs, p = build(shape, r, n, wmode, only=frozenset({"B"}))
    method = build_method("ffa_lora")
    s = scale(ALPHA, r)
    res = method.aggregate(state, uploads, wargs)
    for m, gf in state.factors.items():
        f = res.state.factors[m]
        assert torch.equal(f.A, gf.A)  # frozen, bit-identical
        assert_close(f.B, dense_mean([u.factors[m].B for u in uploads], p), 1e-13)
        # exact: B^{t+1} A^0 = sum_i p_i B_i A^0
        ref = sum(pi * u.factors[m].B @ gf.A for pi, u in zip(p, uploads))
        assert_close(function_of(res, s, m), s * ref, 1e-12)
    assert res.backbone_delta == {}
    assert res.bytes_down == sum(f.B.numel() * 8 for f in res.state.factors.values())
    start = method.client_start(state, ClientContext("c", state.round, r))
    assert start.trainable == {"B"} and start.upload == {"B"}
    assert method.uploaded_factors(state) == {"B"}
    for m, gf in state.factors.items():
        assert torch.equal(start.factors[m].A, gf.A) and torch.equal(start.factors[m].B, gf.B)
        assert start.factors[m].A.data_ptr() != gf.A.data_ptr()  # a copy: training cannot alias


@pytest.mark.parametrize("first", ["B", "A"])
@pytest.mark.parametrize("round_", [0, 1, 2, 3])
@pytest.mark.parametrize(("shape", "r", "n", "wmode"), CASES[::3])
def test_rolora(shape, r, n, wmode, round_, first):
    active = first if round_ % 2 == 0 else ("A" if first == "B" else "B")
    frozen = "A" if active == "B" else "B"
    state, uploads, wargs, p = build(shape, r, n, wmode, round_=round_, only=frozenset({active}))
    method = build_method("rolora", {"first": first})
    s = scale(ALPHA, r)
    assert method.uploaded_factors(state) == {active}
    start = method.client_start(state, ClientContext("c", round_, r))
    assert start.trainable == {active} and start.upload == {active}
    for m, gf in state.factors.items():  # clients start from (copies of) the global factors
        assert torch.equal(start.factors[m].A, gf.A) and torch.equal(start.factors[m].B, gf.B)
        assert start.factors[m].get(frozen).data_ptr() != gf.get(frozen).data_ptr()
    res = method.aggregate(state, uploads, wargs)
    for m, gf in state.factors.items():
        f = res.state.factors[m]
        assert torch.equal(f.get(frozen), gf.get(frozen))
        assert_close(f.get(active), dense_mean([u.factors[m].get(active) for u in uploads], p), 1e-13)
        # exact in the function: only one factor varies across clients
        if active == "B":
            ref = sum(pi * u.factors[m].B @ gf.A for pi, u in zip(p, uploads))
        else:
            ref = sum(pi * gf.B @ u.factors[m].A for pi, u in zip(p, uploads))
        assert_close(function_of(res, s, m), s * ref, 1e-12)
    assert res.bytes_down == sum(f.get(active).numel() * 8 for f in res.state.factors.values())


def test_rolora_alternates_over_rounds():
    shapes = module_shapes(13, 7)
    method = build_method("rolora")
    state = make_state(shapes, 2, seed=1)
    seen = []
    for t in range(4):
        active = next(iter(method.uploaded_factors(state)))
        seen.append(active)
        uploads = make_uploads(shapes, [2, 2], seed=t, only=frozenset({active}))
        state = method.aggregate(state, uploads).state
    assert seen == ["B", "A", "B", "A"]


@pytest.mark.parametrize(("shape", "r", "n", "wmode"), CASES)
def test_fedsa_lora_aggregate(shape, r, n, wmode):
    state, uploads, wargs, p = build(shape, r, n, wmode, only=frozenset({"A"}))
    res = build_method("fedsa_lora").aggregate(state, uploads, wargs)
    for m, gf in state.factors.items():
        assert torch.equal(res.state.factors[m].B, gf.B)
        assert_close(res.state.factors[m].A, dense_mean([u.factors[m].A for u in uploads], p), 1e-13)
    assert res.backbone_delta == {}
    assert res.bytes_down == sum(f.A.numel() * 8 for f in res.state.factors.values())


def test_fedsa_lora_client_memory_round_trip():
    shapes = module_shapes(13, 7)
    r = 2
    method = build_method("fedsa_lora")
    state = make_state(shapes, r, seed=2, zero_b=True)
    ctx = ClientContext("c0", 0, r)
    # first participation: starts from the global factors
    start = method.client_start(state, ctx)
    assert start.trainable == AB and start.upload == {"A"}
    for m, gf in state.factors.items():
        assert torch.equal(start.factors[m].B, gf.B) and torch.equal(start.factors[m].A, gf.A)
    g = gen(3)
    trained = {m: ModuleFactors(A=randn(r, d_in, g=g), B=randn(d_out, r, g=g)) for m, (d_out, d_in) in shapes.items()}
    upload, memory = method.client_finish(state, ctx, start, trained)
    assert set(memory) == {f"{m}.B" for m in shapes}
    for m in shapes:
        assert upload[m].B is None and torch.equal(upload[m].A, trained[m].A)
        assert torch.equal(memory[f"{m}.B"], trained[m].B)
    # the memory is a copy: later in-place changes of the trained tensor do not leak into it
    trained["layer0.q"].B.add_(1.0)
    assert not torch.equal(memory["layer0.q.B"], trained["layer0.q"].B)
    # next round: the server aggregated A; the client restores its own B
    res = method.aggregate(state, [ClientUpload("c0", upload, 5)])
    ctx1 = ClientContext("c0", 1, r, memory=memory)
    start1 = method.client_start(res.state, ctx1)
    for m in shapes:
        assert torch.equal(start1.factors[m].B, memory[f"{m}.B"])
        assert torch.equal(start1.factors[m].A, res.state.factors[m].A)
        assert torch.equal(res.state.factors[m].A, upload[m].A.to(F64))  # one client: mean = itself


# ---- FlexLoRA -------------------------------------------------------------------------------------
def het_ranks(r: int, n: int) -> list[int]:
    return [r - (i % r) for i in range(n)]  # r, r-1, ..., 1, r, ...


@pytest.mark.parametrize(("rslora", "split"), [(False, "balanced"), (True, "left"), (False, "right")])
@pytest.mark.parametrize(("shape", "r", "n", "wmode"), CASES)
def test_flexlora(shape, r, n, wmode, rslora, split):
    ranks = het_ranks(r, n)
    state, uploads, wargs, p = build(shape, r, n, wmode, ranks=ranks, rslora=rslora)
    method = build_method("flexlora", {"split": split})
    res = method.aggregate(state, uploads, wargs)
    s_g = scale(ALPHA, r, rslora)
    for m in state.factors:
        M = dense_sum(uploads, m, [pi * scale(ALPHA, ri, rslora) for pi, ri in zip(p, ranks)])
        f = res.state.factors[m]
        assert f.B.shape[1] == r and f.A.shape[0] == r
        assert_close(s_g * f.B @ f.A, svd_truncate(M, r), 1e-9, "global = SVD_r(M)")
        assert res.report[m]["kept_energy"] == pytest.approx(
            float((torch.linalg.svdvals(M)[:r] ** 2).sum() / (M**2).sum()), rel=1e-9
        )
    assert res.backbone_delta == {}
    # every client (rank r_j <= r) starts from SVD_{r_j}(M) / s_j
    for rj in range(1, r + 1):
        start = method.client_start(res.state, ClientContext("c", res.state.round, rj))
        s_j = scale(ALPHA, rj, rslora)
        for m in state.factors:
            M = dense_sum(uploads, m, [pi * scale(ALPHA, ri, rslora) for pi, ri in zip(p, ranks)])
            fj = start.factors[m]
            assert fj.B.shape[1] == rj and fj.A.shape[0] == rj
            assert_close(s_j * fj.B @ fj.A, svd_truncate(M, rj), 1e-8, f"client rank {rj}")
            # the rescaling is placed as the split places S
            if split == "balanced":
                assert_close(fj.B.mT @ fj.B, fj.A @ fj.A.mT, 1e-9, "balanced client factors")
            elif split == "left":
                assert_close(fj.A @ fj.A.mT, torch.eye(rj, dtype=F64), 1e-9)
            else:
                assert_close(fj.B.mT @ fj.B, torch.eye(rj, dtype=F64), 1e-9)


def test_flexlora_round0_and_rank_above_global():
    state = make_state(module_shapes(13, 7), 4, round_=0, seed=1)
    method = build_method("flexlora")
    start = method.client_start(state, ClientContext("c", 0, 2))
    for m, gf in state.factors.items():  # round 0: the plain leading components of the init
        assert torch.equal(start.factors[m].B, gf.B[:, :2]) and torch.equal(start.factors[m].A, gf.A[:2])
    with pytest.raises(ValueError, match="above the global rank"):
        method.client_start(state, ClientContext("big", 0, 5))


# ---- FLoRA ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize(("shape", "r", "n", "wmode"), CASES)
def test_flora(shape, r, n, wmode, rslora):
    ranks = [r + 1 if i % 3 == 1 else max(1, r - i % 2) for i in range(n)]  # above and below global
    state, uploads, wargs, p = build(shape, r, n, wmode, ranks=ranks, rslora=rslora)
    method = build_method("flora", {"seed": 5})
    res = method.aggregate(state, uploads, wargs)
    s_g = scale(ALPHA, r, rslora)
    for m, (d_out, d_in) in state.shapes().items():
        M = dense_sum(uploads, m, [pi * scale(ALPHA, ri, rslora) for pi, ri in zip(p, ranks)])
        assert_close(res.backbone_delta[m].dense(), M, 1e-12, "W += sum p_i s_i B_i A_i")
        assert res.backbone_delta[m].rank == sum(ranks)
        f = res.state.factors[m]
        assert torch.equal(f.B, torch.zeros(d_out, r, dtype=f.B.dtype))
        assert f.A.shape == (r, d_in) and float(f.A.abs().max()) <= 1 / math.sqrt(d_in)
        assert float(f.A.abs().max()) > 0
        assert_close(function_of(res, s_g, m), M, 1e-12, "function")
    # the fresh A is reproducible from (seed, round)
    again = method.aggregate(state, uploads, wargs)
    fresh = fresh_lora(state.shapes(), r, 5, state.round + 1)
    for m in state.factors:
        assert torch.equal(res.state.factors[m].A, again.state.factors[m].A)
        assert torch.equal(res.state.factors[m].A, fresh[m].A)
    other_seed = build_method("flora", {"seed": 6}).aggregate(state, uploads, wargs)
    assert not torch.equal(other_seed.state.factors["layer0.q"].A, res.state.factors["layer0.q"].A)
    assert res.bytes_down == sum(d.nbytes() for d in res.backbone_delta.values())


# ---- FRLoRA ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("zero_b", [False, True])
@pytest.mark.parametrize(("shape", "r", "n", "wmode"), CASES)
def test_frlora(shape, r, n, wmode, zero_b):
    state, uploads, wargs, p = build(shape, r, n, wmode)
    if zero_b:  # the usual LoRA init: B_0 = 0
        state = make_state(state.shapes(), r, round_=state.round, seed=shape[0] + r + n, zero_b=True)
    s = scale(ALPHA, r)
    uniform = [1.0 / n] * n
    for settings, ref_p in (({}, p if wargs is not None else uniform), ({"weights": "samples"}, p)):
        res = build_method("frlora", settings).aggregate(state, uploads, wargs)
        for m, (d_out, d_in) in state.shapes().items():
            g = state.factors[m]
            assert res.state.factors[m] is g  # every round restarts from the same LoRA: nothing to send
            Bbar = dense_mean([u.factors[m].B for u in uploads], ref_p)
            Abar = dense_mean([u.factors[m].A for u in uploads], ref_p)
            ref = s * (Bbar @ Abar - g.B.to(F64) @ g.A.to(F64))
            delta = res.backbone_delta[m]
            assert (delta.d_out, delta.d_in) == (d_out, d_in)
            assert_close(delta.dense(F64), ref, 1e-10, "W += s (B_bar A_bar - B_0 A_0)", scale=float(ref.norm()) + s)
            # the model after the round is FedIT's: W + s B_bar A_bar
            assert_close(function_of(res, s, m), s * Bbar @ Abar, 1e-10, "function")
            assert delta.rank == (min(r, d_out, d_in) if zero_b else min(2 * r, d_out, d_in))
        assert res.bytes_down == sum(d.nbytes() for d in res.backbone_delta.values())


def test_flora_client_start_ranks():
    state = make_state(module_shapes(13, 7), 2, round_=3, seed=1)
    method = build_method("flora", {"seed": 1})
    small = method.client_start(state, ClientContext("c", 3, 1))
    for m, gf in state.factors.items():
        assert torch.equal(small.factors[m].A, gf.A[:1]) and torch.equal(small.factors[m].B, gf.B[:, :1])
    big = method.client_start(state, ClientContext("c", 3, 4))
    big2 = method.client_start(state, ClientContext("d", 3, 4))
    for m, (d_out, d_in) in state.shapes().items():
        f = big.factors[m]
        assert f.A.shape == (4, d_in) and f.B.shape == (d_out, 4)
        assert torch.equal(f.B, torch.zeros_like(f.B))
        assert torch.equal(f.A, big2.factors[m].A)  # every client of that rank draws the same init


def test_flora_fresh_lora_differs_by_round():
    shapes = module_shapes(13, 7)
    a, b = fresh_lora(shapes, 2, 0, 1), fresh_lora(shapes, 2, 0, 2)
    assert not torch.equal(a["layer0.q"].A, b["layer0.q"].A)
    assert not torch.equal(a["layer0.q"].A, a["layer1.q"].A)  # modules of one shape differ too


# ---- FedSmoothLoRA ---------------------------------------------------------------------------------
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


def test_spec_scale():
    assert LoRASpec(4, 8.0).scale() == 2.0
    assert LoRASpec(4, 8.0, True).scale() == 4.0
    assert LoRASpec(4, 8.0).scale(2) == 4.0
