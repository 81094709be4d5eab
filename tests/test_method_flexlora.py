"""FlexLoRA against a dense float64 reference: SVD of the exact aggregate, redistributed at each client's own rank."""

from __future__ import annotations

import pytest
import torch

from fedlora.methods import ClientContext, build_method
from helpers import (
    ALPHA,
    CASES,
    F64,
    assert_close,
    build,
    declared_flags,
    dense_sum,
    make_state,
    module_shapes,
    scale,
    svd_truncate,
)


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


def test_flexlora_declared_flags():
    """The capabilities FlexLoRA declares, which the conformance suite checks it against."""
    assert declared_flags("flexlora") == {"heterogeneous_ranks"}
