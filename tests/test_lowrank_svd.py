"""The exact factored SVD engine (fedlora.lowrank.svd / batched) against dense torch.linalg."""

from __future__ import annotations

import inspect
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fedlora.lowrank import (
    SPLITS,
    LowRankSVD,
    compute_dtype,
    energy_rank,
    group_by_shape,
    implicit_svd,
    lora_init,
    lora_scale,
    lowrank_svd,
    lowrank_svd_many,
    pad_rank,
    split_factors,
    stack_products,
    svd_device,
    truncated_factors,
    truncated_svd_many,
)
from helpers import F64, assert_close, gen, randn

HYP = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KINDS = ("random", "dup_columns", "deficient", "zero_up", "zero_down", "dup_stack", "tiny_scale")


def make_pair(d_out: int, q: int, d_in: int, kind: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A factor pair ``(up, down)`` of the requested kind (rank-deficient kinds included)."""
    g = gen(seed)
    up, down = randn(d_out, q, g=g), randn(q, d_in, g=g)
    if kind == "dup_columns" and q >= 2:
        # the last q // 2 columns repeat the first ones (and the matching rows of down too)
        h = q // 2
        up[:, q - h :] = up[:, :h]
        down[q - h :] = down[:h]
    elif kind == "deficient" and q >= 2:
        # up of rank 1: every column a multiple of one vector.
        up = randn(d_out, 1, g=g) @ randn(1, q, g=g)
    elif kind == "zero_up":
        up = torch.zeros_like(up)
    elif kind == "zero_down":
        down = torch.zeros_like(down)
    elif kind == "dup_stack":
        # the same client twice: [P, P] @ [Q; Q] = 2 P Q, stacked rank 2q, true rank <= q.
        half = max(1, q // 2)
        P, Q = randn(d_out, half, g=g), randn(half, d_in, g=g)
        up, down = torch.cat([P, P], 1), torch.cat([Q, Q], 0)
    elif kind == "tiny_scale":
        up = up * 1e-150
    return up, down


def check_svd(up: torch.Tensor, down: torch.Tensor, svd: LowRankSVD) -> None:
    d_out, q, d_in = up.shape[-2], up.shape[-1], down.shape[-1]
    k = min(q, d_out, d_in)
    M = up @ down
    assert svd.U.shape == (d_out, k) and svd.S.shape == (k,) and svd.Vh.shape == (k, d_in)
    assert svd.rank == k
    S = svd.S
    # descending and non-negative
    assert bool((S >= 0).all())
    assert bool((S[:-1] >= S[1:]).all()) if k > 1 else True
    # reconstructs the product
    scale_ = max(float(torch.linalg.norm(M)), 1e-300)
    assert float(torch.linalg.norm(svd.dense() - M)) <= 1e-10 * scale_ + 1e-300
    # equals the dense singular values (padded with zeros when the product has fewer)
    ref = torch.linalg.svdvals(M)
    assert torch.allclose(S, ref[:k], rtol=0, atol=1e-10 * max(float(ref[0]) if ref.numel() else 0.0, 1e-300))
    # orthonormal singular vectors where S > 0 (numerically: well above rounding)
    smax = float(S[0]) if k else 0.0
    live = 1e-8 * smax < S if smax > 0 else torch.zeros_like(S, dtype=torch.bool)
    U, Vh = svd.U[:, live], svd.Vh[live]
    n = int(live.sum())
    eye = torch.eye(n, dtype=F64)
    assert torch.allclose(U.mT @ U, eye, atol=1e-10)
    assert torch.allclose(Vh @ Vh.mT, eye, atol=1e-10)


@HYP
@given(
    d_out=st.integers(1, 14),
    d_in=st.integers(1, 14),
    q=st.integers(1, 18),
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 2**31 - 1),
)
def test_lowrank_svd_properties(d_out, d_in, q, kind, seed):
    up, down = make_pair(d_out, q, d_in, kind, seed)
    check_svd(up, down, lowrank_svd(up, down))


@pytest.mark.parametrize(("d_out", "q", "d_in"), [(13, 20, 7), (6, 9, 11), (3, 40, 5), (32, 1, 20), (1, 4, 9)])
def test_lowrank_svd_q_exceeds_dims(d_out, q, d_in):
    """q > d_out or q > d_in: the result has min(q, d_out, d_in) components."""
    up, down = make_pair(d_out, q, d_in, "random", 3)
    check_svd(up, down, lowrank_svd(up, down))


def test_lowrank_svd_zero_inner_dimension():
    svd = lowrank_svd(torch.zeros(5, 0, dtype=F64), torch.zeros(0, 4, dtype=F64))
    assert svd.S.numel() == 0
    assert torch.equal(svd.dense(), torch.zeros(5, 4, dtype=F64))


def test_lowrank_svd_exact_rank_of_duplicated_stack():
    """A duplicated client stack has 2q stacked columns but true rank q: trailing S are zero."""
    g = gen(5)
    P, Q = randn(20, 3, g=g), randn(3, 15, g=g)
    svd = lowrank_svd(torch.cat([P, P], 1), torch.cat([Q, Q], 0))
    assert svd.rank == 6
    assert float(svd.S[3:].abs().max()) <= 1e-12 * float(svd.S[0])
    assert_close(svd.truncate(3).dense(), 2 * P @ Q, 1e-12)


def test_lowrank_svd_rejects_inner_mismatch():
    with pytest.raises(ValueError, match="inner dimensions"):
        lowrank_svd(torch.zeros(4, 3), torch.zeros(2, 5))


def test_lowrank_svd_dtypes():
    g = gen(1)
    up, down = randn(9, 3, g=g, dtype=torch.float32), randn(3, 6, g=g, dtype=torch.float32)
    assert lowrank_svd(up, down).S.dtype == torch.float32
    svd64 = lowrank_svd(up, down, dtype=torch.float64)
    assert svd64.U.dtype == F64 and svd64.S.dtype == F64
    assert_close(svd64.dense(), up.double() @ down.double(), 1e-12)
    # half precision is promoted; mixed with float64 computes in float64
    assert lowrank_svd(up.half(), down.half()).S.dtype == torch.float32
    assert lowrank_svd(up.bfloat16(), down.double()).S.dtype == F64
    with pytest.raises(ValueError, match="float32 or float64"):
        lowrank_svd(up, down, dtype=torch.float16)


def test_compute_dtype():
    a32, a64, a16 = torch.zeros(1), torch.zeros(1, dtype=F64), torch.zeros(1, dtype=torch.float16)
    assert compute_dtype(None, a32) == torch.float32
    assert compute_dtype(None, a32, a64) == torch.float64
    assert compute_dtype(None, a16) == torch.float32
    assert compute_dtype(torch.float64, a32) == torch.float64
    with pytest.raises(ValueError):
        compute_dtype(torch.bfloat16, a32)


@HYP
@given(
    b=st.integers(1, 4),
    d_out=st.integers(1, 10),
    d_in=st.integers(1, 10),
    q=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
)
def test_lowrank_svd_batched_equals_per_slice(b, d_out, d_in, q, seed):
    g = gen(seed)
    ups, downs = randn(b, d_out, q, g=g), randn(b, q, d_in, g=g)
    svd = lowrank_svd(ups, downs)
    k = min(q, d_out, d_in)
    assert svd.U.shape == (b, d_out, k) and svd.S.shape == (b, k) and svd.Vh.shape == (b, k, d_in)
    M = ups @ downs
    for i in range(b):
        check_svd(ups[i], downs[i], LowRankSVD(svd.U[i], svd.S[i], svd.Vh[i]))
        assert torch.allclose(svd.S[i], torch.linalg.svdvals(M[i])[:k], atol=1e-10 * float(svd.S[i, 0]) + 1e-300)
    # batched helpers of LowRankSVD
    assert torch.allclose(svd.dense(), M, atol=1e-10 * float(M.abs().max()) + 1e-300)
    assert torch.allclose(svd.energy(), (M**2).sum((-2, -1)), rtol=1e-10)
    assert svd.truncate(1).U.shape == (b, d_out, 1)


# ``stack`` (batch shape groups into stacked calls; off by default on CPU) where supported.
STACK_MODES = [{}] + ([{"stack": True}] if "stack" in inspect.signature(lowrank_svd_many).parameters else [])


@pytest.mark.parametrize("mode", STACK_MODES, ids=lambda kw: "stacked" if kw else "default")
def test_lowrank_svd_many_equals_per_module_calls(mode):
    g = gen(11)
    pairs = {}
    for i in range(5):
        pairs[f"a{i}"] = (randn(13, 6, g=g), randn(6, 7, g=g))
    for i in range(3):
        pairs[f"b{i}"] = (randn(7, 4, g=g), randn(4, 13, g=g))
    pairs["c"] = (randn(32, 10, g=g), randn(10, 20, g=g))
    assert group_by_shape(pairs) == {
        (13, 6, 7): [f"a{i}" for i in range(5)],
        (7, 4, 13): ["b0", "b1", "b2"],
        (32, 10, 20): ["c"],
    }
    # a small max_batch_elements forces chunks (of 2 for the first group) plus singletons
    for budget in (1 << 27, 2 * (13 + 7) * 6, 1):
        many = lowrank_svd_many(pairs, max_batch_elements=budget, **mode)
        assert list(many) == list(pairs)
        for name, (up, down) in pairs.items():
            one = lowrank_svd(up, down)
            got = many[name]
            assert torch.allclose(got.S, one.S, rtol=0, atol=1e-12 * float(one.S[0]))
            # singular vectors agree up to sign; products agree exactly-ish
            sign = torch.sign((got.U * one.U).sum(0))
            assert torch.allclose(got.U * sign, one.U, atol=1e-10)
            assert torch.allclose(got.Vh * sign.unsqueeze(-1), one.Vh, atol=1e-10)
            assert_close(got.dense(), up @ down, 1e-12)


def test_lowrank_svd_many_dtype_argument():
    g = gen(2)
    pairs = {"x": (randn(5, 2, g=g), randn(2, 8, g=g)), "y": (randn(5, 2, g=g), randn(2, 8, g=g))}
    many = lowrank_svd_many(pairs, dtype=torch.float32)
    assert all(v.S.dtype == torch.float32 for v in many.values())


# ---- energy rank ---------------------------------------------------------------------------
def brute_energy_rank(S: list[float], tau: float) -> tuple[int, Fraction | None]:
    """Smallest k with sum_{j<k} s_j^2 >= tau * total, in exact rational arithmetic; also the
    (exact) distance of the k boundary to the threshold, to skip rounding-level ties."""
    e = [Fraction(x) ** 2 for x in S]
    total = sum(e, Fraction(0))
    if total == 0:
        return 0, None
    t = Fraction(tau)
    prefix = Fraction(0)
    for k in range(len(e) + 1):
        if prefix >= t * total:
            gap = min(abs(prefix - t * total), abs(prefix - e[k - 1] - t * total) if k else Fraction(1))
            return k, gap / total
        if k < len(e):
            prefix += e[k]
    raise AssertionError("unreachable")


@HYP
@given(
    # magnitudes whose squares stay normal floats (s^2 of 1e-200 underflows to 0)
    S=st.lists(st.one_of(st.just(0.0), st.floats(1e-100, 1e3)), min_size=1, max_size=24),
    tau=st.one_of(st.sampled_from([0.0, 1.0, 0.5, 0.9, 0.99, 0.9999]), st.floats(0, 1)),
    zeros=st.integers(0, 3),
)
def test_energy_rank_matches_brute_force(S, tau, zeros):
    S = sorted(S, reverse=True) + [0.0] * zeros
    k = energy_rank(torch.tensor(S, dtype=F64), tau)
    ref, gap = brute_energy_rank(S, tau)
    assume(gap is None or gap > 1e-12 or ref == k)
    assert k == ref
    nonzero = sum(1 for x in S if x > 0)
    if tau == 1.0:
        assert k == nonzero
    if tau == 0.0:
        assert k == 0


def test_energy_rank_tau_extremes_on_many_spectra():
    """tau = 0 keeps nothing and tau = 1 every non-zero component, whatever the summation
    order does to the rounding of the total (a regression: 0 came out as 1 for ~1 in 4)."""
    g = gen(0)
    for _ in range(200):
        n = int(torch.randint(1, 40, (1,), generator=g))
        S = torch.rand(n, generator=g, dtype=F64).sort(descending=True).values * 10
        assert energy_rank(S, 0.0) == 0
        assert energy_rank(S, 1.0) == n
        assert energy_rank(torch.cat([S, torch.zeros(3, dtype=F64)]), 1.0) == n


def test_energy_rank_edges():
    assert energy_rank(torch.zeros(4), 0.9) == 0
    assert energy_rank(torch.tensor([3.0, 4.0, 0.0]), 1.0) == 2
    assert energy_rank(torch.tensor([3.0, 4.0, 0.0]), 0.0) == 0
    # 3^2 = 9 of 25 is 36%: tau=0.36 keeps 1, a hair above keeps 2
    assert energy_rank(torch.tensor([3.0, 4.0]), 0.36) == 1
    assert energy_rank(torch.tensor([3.0, 4.0]), 0.3601) == 2
    with pytest.raises(ValueError, match="tau"):
        energy_rank(torch.ones(3), 1.5)
    with pytest.raises(ValueError, match="tau"):
        energy_rank(torch.ones(3), -0.1)
    with pytest.raises(ValueError, match="1-D"):
        energy_rank(torch.ones(2, 3), 0.5)


# ---- splits --------------------------------------------------------------------------------
@HYP
@given(
    d_out=st.integers(1, 12),
    d_in=st.integers(1, 12),
    q=st.integers(1, 10),
    kind=st.sampled_from(KINDS),
    split=st.sampled_from(SPLITS),
    seed=st.integers(0, 2**31 - 1),
)
def test_split_factors_reproduce_product(d_out, d_in, q, kind, split, seed):
    up, down = make_pair(d_out, q, d_in, kind, seed)
    svd = lowrank_svd(up, down)
    B, A = split_factors(svd, split)
    M = up @ down
    assert B.shape == (d_out, svd.rank) and A.shape == (svd.rank, d_in)
    assert float(torch.linalg.norm(B @ A - M)) <= 1e-10 * float(torch.linalg.norm(M)) + 1e-300
    D = torch.diag(svd.S)
    tol = 1e-10 * max(float(svd.S[0]), 1e-300)
    if split == "balanced":
        assert torch.allclose(B.mT @ B, D, atol=tol)
        assert torch.allclose(A @ A.mT, D, atol=tol)
    elif split == "left":
        assert torch.allclose(A, svd.Vh) and torch.allclose(B.mT @ B, D**2, atol=tol * float(svd.S[0]) + 1e-300)
    else:
        assert torch.allclose(B, svd.U) and torch.allclose(A @ A.mT, D**2, atol=tol * float(svd.S[0]) + 1e-300)


def test_split_factors_unknown():
    svd = lowrank_svd(torch.ones(3, 1), torch.ones(1, 2))
    with pytest.raises(ValueError, match="unknown split"):
        split_factors(svd, "diagonal")  # type: ignore[arg-type]


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize(("d_out", "d_in", "q", "rank"), [(13, 7, 8, 2), (6, 11, 5, 4), (32, 20, 12, 1), (9, 5, 2, 4)])
def test_truncated_factors_is_dense_truncation(split, d_out, d_in, q, rank):
    g = gen(d_out * 100 + rank)
    up, down = randn(d_out, q, g=g), randn(q, d_in, g=g)
    B, A = truncated_factors(up, down, rank, split)
    assert B.shape == (d_out, rank) and A.shape == (rank, d_in)
    M = up @ down
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    k = min(rank, q)
    assert_close(B @ A, (U[:, :k] * S[:k]) @ Vh[:k], 1e-10)
    if rank > q:  # padded with zero components
        assert torch.equal(B[:, q:], torch.zeros(d_out, rank - q, dtype=F64))
        assert torch.equal(A[q:], torch.zeros(rank - q, d_in, dtype=F64))


def test_pad_rank():
    B, A = torch.ones(4, 2), torch.ones(2, 3)
    B2, A2 = pad_rank(B, A, 5)
    assert B2.shape == (4, 5) and A2.shape == (5, 3)
    assert torch.equal(B2 @ A2, B @ A)
    B3, A3 = pad_rank(B, A, 1)  # never truncates
    assert B3 is B and A3 is A
    Bb, Ab = pad_rank(torch.ones(3, 4, 2), torch.ones(3, 2, 5), 4)
    assert Bb.shape == (3, 4, 4) and Ab.shape == (3, 4, 5)


# ---- stacking --------------------------------------------------------------------------------
def test_stack_products_weighted_heterogeneous():
    g = gen(3)
    ranks, w = [1, 3, 2], [0.2, -1.5, 3.0]
    ups = [randn(8, r, g=g) for r in ranks]
    downs = [randn(r, 5, g=g) for r in ranks]
    P, Q = stack_products(ups, downs, w)
    assert P.shape == (8, 6) and Q.shape == (6, 5)
    ref = sum(wi * (u @ d) for wi, u, d in zip(w, ups, downs))
    assert_close(P @ Q, ref, 1e-13)
    P0, Q0 = stack_products(ups, downs)
    assert_close(P0 @ Q0, sum(u @ d for u, d in zip(ups, downs)), 1e-13)
    P1, _ = stack_products(ups, downs, torch.tensor(w, dtype=F64))
    assert torch.equal(P1, P)
    with pytest.raises(ValueError):
        stack_products(ups, downs[:2])
    with pytest.raises(ValueError):
        stack_products([], [])
    with pytest.raises(ValueError, match="weights"):
        stack_products(ups, downs, [1.0, 2.0])


def test_lowrank_svd_of_stack_matches_dense_svd():
    """The engine's use: SVD of sum_i p_i B_i A_i from the stacked factors."""
    g = gen(4)
    ups = [randn(32, 4, g=g) for _ in range(5)]
    downs = [randn(4, 20, g=g) for _ in range(5)]
    p = [0.1, 0.3, 0.2, 0.25, 0.15]
    svd = lowrank_svd(*stack_products(ups, downs, p))
    M = sum(pi * (u @ d) for pi, u, d in zip(p, ups, downs))
    assert svd.rank == 20
    assert torch.allclose(svd.S, torch.linalg.svdvals(M), atol=1e-12 * float(svd.S[0]))
    for k in (1, 4, 7):
        assert_close(svd.truncate(k).dense(), _dense_trunc(M, k), 1e-10)
    band = svd.components(4, 9)
    assert band.rank == 5
    assert_close(band.dense(), _dense_trunc(M, 9) - _dense_trunc(M, 4), 1e-10)
    assert math.isclose(float(svd.energy()), float((M**2).sum()), rel_tol=1e-12)


def _dense_trunc(M, k):
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


# ---- LoRA conventions --------------------------------------------------------------------------
def test_lora_scale():
    assert lora_scale(16, 4) == 4.0
    assert lora_scale(16, 4, use_rslora=True) == 8.0
    assert lora_scale(3, 2) == 1.5
    with pytest.raises(ValueError):
        lora_scale(16, 0)


def test_lora_init():
    B, A = lora_init(7, 25, 3, gen(0), dtype=F64)
    assert B.shape == (7, 3) and A.shape == (3, 25) and A.dtype == F64
    assert torch.equal(B, torch.zeros(7, 3, dtype=F64))
    assert float(A.abs().max()) <= 1 / 5 and float(A.abs().max()) > 0.1  # U(-1/sqrt(25), 1/sqrt(25))
    _, A2 = lora_init(7, 25, 3, gen(0), dtype=F64)
    assert torch.equal(A, A2)


def test_stack_products_layout_dtype_and_batch():
    """P is written column-major and Q row-major (LAPACK's layouts, so the QRs can run in
    place), in the requested dtype, with leading batch dimensions kept."""
    g = gen(5)
    ups = [randn(3, 9, 2, g=g).float(), randn(3, 9, 4, g=g).to(torch.bfloat16)]
    downs = [randn(3, 2, 7, g=g).float(), randn(3, 4, 7, g=g).float()]
    P, Q = stack_products(ups, downs, [0.5, -2.0], dtype=torch.float64)
    assert P.shape == (3, 9, 6) and Q.shape == (3, 6, 7)
    assert P.dtype == Q.dtype == F64
    assert P.mT.is_contiguous() and not P.is_contiguous() and Q.is_contiguous()
    ref = 0.5 * ups[0].double() @ downs[0].double() - 2.0 * ups[1].double() @ downs[1].double()
    assert_close(P @ Q, ref, 1e-13)
    # default dtype: the promoted inputs' (bfloat16 and float32 -> float32)
    assert stack_products(ups, downs)[0].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_implicit_svd_overwrite_factors_in_place(dtype):
    """With overwrite=True the QRs reuse stack_products' buffers (no copy of the tall
    factors) and give the same SVD; without it the inputs are left untouched."""
    g = gen(6)
    ups = [randn(40, 3, g=g).to(dtype) for _ in range(4)]
    downs = [randn(3, 30, g=g).to(dtype) for _ in range(4)]
    P, Q = stack_products(ups, downs, [0.1, 0.2, 0.3, 0.4])
    P_saved, Q_saved = P.clone(), Q.clone()
    ref = implicit_svd(P, Q)
    assert torch.equal(P, P_saved) and torch.equal(Q, Q_saved)
    got = implicit_svd(P, Q, overwrite=True)
    assert got.up_reflectors.data_ptr() == P.data_ptr()
    assert got.down_reflectors.data_ptr() == Q.data_ptr()
    assert not torch.equal(P, P_saved)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(got.S, ref.S, rtol=0, atol=tol * float(ref.S[0]))
    assert_close(got.leading(5).dense().double(), ref.leading(5).dense().double(), tol)
    # a row-major up (not LAPACK's layout) is copied even with overwrite=True
    up = P_saved.contiguous()
    implicit_svd(up, Q_saved.clone(), overwrite=True)
    assert torch.equal(up, P_saved.contiguous())


@pytest.mark.parametrize("stack", [False, True])
def test_truncated_svd_many_streams_pairs_per_shape(stack):
    """Pairs built on demand, stacked in chunks per shape (or one by one), kept components
    chosen from all singular values: the same as per-module calls, in the input order."""
    g = gen(12)
    shapes = {"a0": (13, 6, 7), "b0": (7, 4, 13), "a1": (13, 6, 7), "a2": (13, 6, 7), "b1": (7, 4, 13)}
    pairs = {n: (randn(d, q, g=g), randn(q, k, g=g)) for n, (d, q, k) in shapes.items()}
    built = []

    def make(n):
        built.append(n)
        up, down = pairs[n]
        return stack_products([up], [down])

    for budget in (1 << 27, 2 * (13 + 7) * 6, 1):
        built.clear()
        out = truncated_svd_many(
            list(pairs), make, lambda n, S: 3, max_batch_elements=budget, stack=stack, overwrite=True, workers=2
        )
        assert list(out) == list(pairs) and sorted(built) == sorted(pairs)
        for n, (up, down) in pairs.items():
            S, svd = out[n]
            assert torch.allclose(S, torch.linalg.svdvals(up @ down)[: up.shape[1]], atol=1e-12 * float(S[0]))
            assert svd.rank == 3
            assert_close(svd.dense(), _dense_trunc(up @ down, 3), 1e-10)
    with svd_device("cpu"):  # the runtime's context: same results on the inputs' device
        S, svd = truncated_svd_many(["a0"], make, stack=stack)["a0"]
        assert S.device.type == "cpu" and svd.rank == 6


def test_svd_device_context_is_scoped():
    from fedlora.lowrank.batched import _DEVICE

    assert _DEVICE.get() is None
    with svd_device("cpu"):
        assert _DEVICE.get() == torch.device("cpu")
        with svd_device(None):
            assert _DEVICE.get() is None
    assert _DEVICE.get() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_truncated_svd_many_on_gpu_returns_to_cpu():
    g = gen(13)
    pairs = {f"m{i}": (randn(64, 8, g=g).float(), randn(8, 48, g=g).float()) for i in range(3)}
    with svd_device("cuda"):
        out = truncated_svd_many(list(pairs), lambda n: stack_products(*map(list, zip(pairs[n]))), lambda n, S: 4)
    for n, (up, down) in pairs.items():
        S, svd = out[n]
        assert S.device.type == "cpu" and svd.U.device.type == "cpu"
        assert_close(svd.dense().double(), _dense_trunc(up.double() @ down.double(), 4), 1e-5)
