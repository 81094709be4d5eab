"""RoLoRA against a dense float64 reference: B and A trained and averaged in alternate rounds."""

from __future__ import annotations

import pytest
import torch

from fedlora.methods import ClientContext, build_method
from helpers import (
    ALPHA,
    CASES,
    assert_close,
    build,
    declared_flags,
    dense_mean,
    function_of,
    make_state,
    make_uploads,
    module_shapes,
    scale,
)


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


def test_rolora_declared_flags():
    """The capabilities RoLoRA declares, which the conformance suite checks it against."""
    assert declared_flags("rolora") == set()
