"""FedIT against a dense float64 reference: A and B averaged separately (the inexact baseline)."""

from __future__ import annotations

import pytest

from fedlora.methods import build_method
from helpers import (
    ALPHA,
    CASES,
    assert_close,
    build,
    declared_flags,
    dense_mean,
    dense_sum,
    function_of,
    rel_err,
    scale,
)


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


def test_fedit_declared_flags():
    """The capabilities FedIT declares, which the conformance suite checks it against."""
    assert declared_flags("fedit") == set()
