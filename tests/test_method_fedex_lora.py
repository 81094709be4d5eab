"""FedEx-LoRA against a dense float64 reference: FedIT's factor means + the exact residual in the backbone."""

from __future__ import annotations

import pytest
import torch

from fedlora.methods import build_method
from helpers import ALPHA, CASES, assert_close, build, declared_flags, dense_mean, dense_sum, function_of, scale


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


def test_fedex_lora_declared_flags():
    """The capabilities FedEx-LoRA declares, which the conformance suite checks it against."""
    assert declared_flags("fedex_lora") == {"changes_backbone"}
