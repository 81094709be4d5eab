"""FRLoRA against a dense float64 reference: averaged factors merged into the backbone, LoRA restarted."""

from __future__ import annotations

import pytest

from fedlora.methods import build_method
from helpers import ALPHA, CASES, F64, assert_close, build, declared_flags, dense_mean, function_of, make_state, scale


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


def test_frlora_declared_flags():
    """The capabilities FRLoRA declares, which the conformance suite checks it against."""
    assert declared_flags("frlora") == {"changes_backbone"}
