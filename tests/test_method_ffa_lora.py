"""FFA-LoRA against a dense float64 reference: A frozen at its init, only B trained and averaged."""

from __future__ import annotations

import pytest
import torch

from fedlora.methods import ClientContext, build_method
from helpers import ALPHA, CASES, assert_close, build, declared_flags, dense_mean, function_of, scale


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


def test_ffa_lora_declared_flags():
    """The capabilities FFA-LoRA declares, which the conformance suite checks it against."""
    assert declared_flags("ffa_lora") == set()
