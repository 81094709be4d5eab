"""FactoredDelta: a backbone update kept as a sum of low-rank terms."""

from __future__ import annotations

import pytest
import torch

from fedlora.lowrank import FactoredDelta
from helpers import F64, assert_close, gen, randn


def terms(d_out, d_in, ranks, seed=0, dtype=F64):
    g = gen(seed)
    return [(randn(d_out, r, g=g, dtype=dtype), randn(r, d_in, g=g, dtype=dtype)) for r in ranks]


def test_add_extend_scaled_factors_dense():
    ts = terms(13, 7, [2, 3, 1])
    d = FactoredDelta(13, 7)
    assert d.is_empty and d.rank == 0
    d.add(*ts[0]).add(*ts[1], scale=-0.5)
    assert d.rank == 5 and not d.is_empty
    ref = ts[0][0] @ ts[0][1] - 0.5 * ts[1][0] @ ts[1][1]
    assert_close(d.dense(), ref, 1e-14)
    up, down = d.factors()
    assert up.shape == (13, 5) and down.shape == (5, 7)
    assert_close(up @ down, ref, 1e-14)

    e = FactoredDelta.from_factors(*ts[2])
    assert (e.d_out, e.d_in, e.rank) == (13, 7, 1)
    d.extend(e, scale=2.0)
    assert d.rank == 6
    ref = ref + 2.0 * ts[2][0] @ ts[2][1]
    assert_close(d.dense(), ref, 1e-14)
    # extending does not alias the other delta's list
    assert e.rank == 1

    s = d.scaled(-3.0)
    assert_close(s.dense(), -3.0 * ref, 1e-14)
    assert_close(d.dense(), ref, 1e-14)  # the original is unchanged
    assert s.rank == d.rank

    # plus/copy make new deltas; neither input gains a term
    p = e.plus(d, scale=-1.0)
    assert (p.rank, e.rank, d.rank) == (7, 1, 6)
    assert_close(p.dense(), ts[2][0] @ ts[2][1] - ref, 1e-14)
    c = e.copy()
    c.add(*ts[0])
    assert (c.rank, e.rank) == (3, 1)


def test_add_rejects_bad_shapes_and_skips_empty():
    d = FactoredDelta(6, 11)
    with pytest.raises(ValueError):
        d.add(torch.zeros(6, 2), torch.zeros(3, 11))  # inner mismatch
    with pytest.raises(ValueError):
        d.add(torch.zeros(11, 2), torch.zeros(2, 6))  # transposed
    with pytest.raises(ValueError):
        d.add(torch.zeros(6), torch.zeros(1, 11))  # not 2-D
    d.add(torch.zeros(6, 0), torch.zeros(0, 11))
    assert d.is_empty and d.ups == []


def test_empty_factors_and_dense():
    d = FactoredDelta(4, 3)
    up, down = d.factors(F64)
    assert up.shape == (4, 0) and down.shape == (0, 3) and up.dtype == F64
    assert torch.equal(d.dense(), torch.zeros(4, 3, dtype=F64))
    assert d.nbytes() == 0
    assert d.energy() == 0.0


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_energy_is_the_squared_frobenius_norm_of_the_sum(dtype):
    d = FactoredDelta(13, 9)
    for up, down in terms(13, 9, [2, 3, 1], seed=4, dtype=dtype):
        d.add(up, down)
    d.add(*terms(13, 9, [2], seed=4, dtype=dtype)[0], scale=-1.0)  # cancels the first term exactly
    assert d.energy() == pytest.approx(float(d.dense().pow(2).sum()), rel=1e-12 if dtype == F64 else 1e-5)


@pytest.mark.parametrize(("d_out", "d_in"), [(13, 7), (6, 11), (32, 20)])
def test_compress_preserves_dense_and_reduces_duplicates(d_out, d_in):
    (P, Q), (P2, Q2) = terms(d_out, d_in, [2, 1], seed=d_out)
    d = FactoredDelta(d_out, d_in)
    for _ in range(3):  # the same rank-2 term three times
        d.add(P, Q)
    d.add(P2, Q2, scale=0.25)
    assert d.rank == 7
    c = d.compress()
    assert c.rank == 3  # true rank: 2 + 1
    assert len(c.ups) == 1
    assert_close(c.dense(), d.dense(), 1e-12)
    # the compressed pair is balanced: up^T up = down down^T (diagonal S)
    up, down = c.factors()
    assert_close(up.mT @ up, down @ down.mT, 1e-12)
    # a term that cancels: what is left is rounding noise, at the rounding level of the factors
    z = FactoredDelta.from_factors(P, Q).add(P, Q, scale=-1.0).compress()
    assert z.rank <= P.shape[1] * 2
    assert float(torch.linalg.norm(z.dense())) <= 1e-14 * float(torch.linalg.norm(P) * torch.linalg.norm(Q))
    # exact zeros compress away
    assert FactoredDelta.from_factors(P, torch.zeros_like(Q)).compress().is_empty
    assert FactoredDelta(d_out, d_in).compress().is_empty


def test_compress_rtol_and_max_rank():
    g = gen(2)
    U, _ = torch.linalg.qr(randn(20, 4, g=g))
    V, _ = torch.linalg.qr(randn(9, 4, g=g))
    S = torch.tensor([10.0, 1.0, 1e-3, 1e-8], dtype=F64)
    d = FactoredDelta.from_factors(U * S, V.mT)
    assert d.compress().rank == 4
    kept = d.compress(rtol=1e-5)
    assert kept.rank == 3
    assert_close(kept.dense(), (U[:, :3] * S[:3]) @ V[:, :3].mT, 1e-12)
    top = d.compress(max_rank=2)
    assert top.rank == 2
    assert_close(top.dense(), (U[:, :2] * S[:2]) @ V[:, :2].mT, 1e-12)


def test_compress_keeps_dtype():
    ((P, Q),) = terms(8, 5, [2], dtype=torch.float32)
    c = FactoredDelta.from_factors(P, Q).add(P, Q).compress()
    assert c.ups[0].dtype == torch.float32 and c.rank == 2
    assert_close(c.dense(), 2 * P.double() @ Q.double(), 1e-5)


def test_nbytes():
    (P, Q), (P2, Q2) = terms(13, 7, [2, 3], dtype=torch.float32)
    d = FactoredDelta.from_factors(P, Q).add(P2, Q2)
    assert d.nbytes() == (13 + 7) * 5 * 4
    assert d.nbytes(bytes_per_element=2) == (13 + 7) * 5 * 2
    d64 = FactoredDelta.from_factors(P.double(), Q.double())
    assert d64.nbytes() == (13 + 7) * 2 * 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("alpha", [1.0, -0.7])
def test_apply_to_dense_weight(dtype, alpha):
    ts = terms(13, 7, [2, 3], seed=3)
    d = FactoredDelta(13, 7)
    for u, v in ts:
        d.add(u.float(), v.float())
    W0 = randn(13, 7, g=gen(9)).to(dtype)
    W = W0.clone()
    out = d.apply_to(W, alpha=alpha)
    assert out is W and W.dtype == dtype
    ref64 = W0.double() + alpha * sum(u.float().double() @ v.float().double() for u, v in ts)
    if dtype == torch.float64:
        assert_close(W, ref64, 1e-6)  # factors were float32
    elif dtype == torch.float32:
        assert torch.allclose(W.double(), ref64, rtol=1e-6, atol=1e-5)
    else:
        # accumulated in float32 and rounded once: within one bf16 rounding of the exact result
        assert torch.allclose(W.double(), ref64, rtol=2**-8, atol=1e-6)
        expected = ref64.to(torch.bfloat16)
        # at most a handful of 1-ulp ties differ from rounding the exact value
        assert int((expected != W).sum()) <= 2


def test_apply_to_bf16_accumulates_in_fp32():
    """Two terms that nearly cancel: a bf16 accumulation would lose the small remainder."""
    g = gen(4)
    P, Q = randn(8, 2, g=g).float(), randn(2, 6, g=g).float()
    small = 1e-2
    d = FactoredDelta.from_factors(P * 300.0, Q).add(P * (-300.0 + small), Q)
    W = torch.zeros(8, 6, dtype=torch.bfloat16)
    d.apply_to(W)
    ref = (small * (P.double() @ Q.double())).to(torch.bfloat16)
    assert torch.allclose(W.double(), ref.double(), rtol=2**-6, atol=1e-4)


def test_apply_to_fan_in_fan_out_transposes():
    ts = terms(13, 7, [3], seed=5)
    d = FactoredDelta.from_factors(*ts[0])
    W0 = randn(7, 13, g=gen(1))  # Conv1D orientation: (d_in, d_out)
    W = W0.clone()
    d.apply_to(W, fan_in_fan_out=True)
    assert_close(W, W0 + (ts[0][0] @ ts[0][1]).mT, 1e-14)
    with pytest.raises(ValueError, match="fan_in_fan_out=False"):
        d.apply_to(W0.clone())  # (7, 13) is the wrong shape for a Linear weight
    with pytest.raises(ValueError, match="fan_in_fan_out=True"):
        d.apply_to(torch.zeros(13, 7, dtype=F64), fan_in_fan_out=True)
    with pytest.raises(ValueError):
        d.apply_to(torch.zeros(13, 8, dtype=F64))


def test_apply_to_noop_cases():
    W0 = randn(5, 4, g=gen(2))
    W = W0.clone()
    FactoredDelta(5, 4).apply_to(W)
    assert torch.equal(W, W0)
    FactoredDelta.from_factors(torch.ones(5, 1, dtype=F64), torch.ones(1, 4, dtype=F64)).apply_to(W, alpha=0.0)
    assert torch.equal(W, W0)


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16])
def test_inner_product_is_the_dense_frobenius_inner_product(dtype):
    """``<D1, D2>_F`` from the factors (different ranks, several terms each) equals the dense
    float64 one; ``inner(self)`` is ``energy()``; an empty delta gives 0; shapes must agree."""
    g = gen(3)
    a, b = FactoredDelta(13, 9), FactoredDelta(13, 9)
    for q in (2, 5):
        a.add(randn(13, q, g=g, dtype=dtype), randn(q, 9, g=g, dtype=dtype))
    b.add(randn(13, 3, g=g, dtype=dtype), randn(3, 9, g=g, dtype=dtype), scale=-0.7)
    ref = float((a.dense() * b.dense()).sum())
    assert abs(a.inner(b) - ref) <= 1e-12 * (a.energy() * b.energy()) ** 0.5
    assert a.inner(b) == pytest.approx(b.inner(a), rel=1e-12)
    assert a.inner(a) == pytest.approx(a.energy(), rel=1e-12)
    assert FactoredDelta(13, 9).inner(a) == 0.0 == a.inner(FactoredDelta(13, 9))
    with pytest.raises(ValueError, match="shapes differ"):
        a.inner(FactoredDelta(9, 13))


@pytest.mark.parametrize(("d_out", "d_in", "ranks"), [(13, 9, (2, 5)), (6, 20, (4, 4, 3))])  # stored rank > d_out too
def test_norm_is_the_dense_frobenius_norm_and_survives_cancellation(d_out, d_in, ranks):
    """``norm()`` from QRs equals the dense float64 norm; for a difference of two nearly equal
    updates (relative gap 1e-9) it keeps the digits that ``sqrt(energy())`` loses to its Gram sum."""
    a = FactoredDelta(d_out, d_in)
    for up, down in terms(d_out, d_in, ranks, seed=4):
        a.add(up, down)
    assert a.norm() == pytest.approx(float(torch.linalg.matrix_norm(a.dense())), rel=1e-13)
    assert FactoredDelta(d_out, d_in).norm() == 0.0
    up, down = a.factors()
    tweak = randn(d_out, 1, g=gen(5)) * 1e-9, randn(1, d_in, g=gen(6))
    near = FactoredDelta(d_out, d_in).add(up, down).add(*tweak)
    gap = near.extend(a, scale=-1.0)  # = tweak, formed from terms 1e9 times its size
    want = float(torch.linalg.matrix_norm(tweak[0] @ tweak[1]))
    assert gap.norm() == pytest.approx(want, rel=1e-5)
    assert abs(max(gap.energy(), 0.0) ** 0.5 - want) > 1e-3 * want  # the Gram route cannot
