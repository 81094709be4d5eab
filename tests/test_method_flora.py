"""FLoRA against a dense float64 reference: stacked client LoRAs merged into the backbone, a fresh LoRA each round."""

from __future__ import annotations

import math

import pytest
import torch

from fedlora.methods import ClientContext, build_method
from fedlora.methods.flora import fresh_lora
from helpers import (
    ALPHA,
    CASES,
    assert_close,
    build,
    declared_flags,
    dense_sum,
    function_of,
    make_state,
    module_shapes,
    scale,
)


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


def test_flora_declared_flags():
    """The capabilities FLoRA declares, which the conformance suite checks it against."""
    assert declared_flags("flora") == {"heterogeneous_ranks", "ranks_above_global", "changes_backbone"}
