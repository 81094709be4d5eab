"""FedSA-LoRA against a dense float64 reference: A shared and averaged, each client keeps its own B."""

from __future__ import annotations

import pytest
import torch

from fedlora.methods import ClientContext, ModuleFactors, build_method
from fedlora.methods.base import AB, ClientUpload
from helpers import CASES, F64, assert_close, build, declared_flags, dense_mean, gen, make_state, module_shapes, randn


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


def test_fedsa_lora_declared_flags():
    """The capabilities FedSA-LoRA declares, which the conformance suite checks it against."""
    assert declared_flags("fedsa_lora") == set()
