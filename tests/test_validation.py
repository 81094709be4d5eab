"""Upload screening: every problem is rejected, naming the client and the module."""

from __future__ import annotations

import pytest
import torch

from fedlora.methods import ClientUpload, ModuleFactors, build_method
from fedlora.methods.validation import InvalidUpdate, check_upload, screen_uploads
from helpers import F64, make_state, make_uploads, module_shapes

SHAPES = module_shapes(13, 7)
R = 2


def valid(cid="client0", ranks=(R,), only=None):
    u = make_uploads(SHAPES, list(ranks), seed=3, only=only)[0]
    u.client_id = cid
    return u


def with_factor(u: ClientUpload, module: str, **change) -> ClientUpload:
    f = u.factors[module]
    factors = dict(u.factors)
    factors[module] = ModuleFactors(A=change.get("A", f.A), B=change.get("B", f.B))
    return ClientUpload(u.client_id, factors, u.num_examples)


def nan_at(t: torch.Tensor, value: float) -> torch.Tensor:
    t = t.clone()
    t[1, 1] = value
    return t


def defects():
    """(label, upload builder, module named in the message, message fragment)."""
    u = valid("alice")
    m = "layer0.v"  # shape (7, 13)
    f = u.factors[m]
    return [
        ("nan", with_factor(u, m, A=nan_at(f.A, float("nan"))), m, "non-finite"),
        ("inf", with_factor(u, m, B=nan_at(f.B, float("inf"))), m, "non-finite"),
        ("neg_inf", with_factor(u, m, A=nan_at(f.A, float("-inf"))), m, "non-finite"),
        ("wrong_shape_A", with_factor(u, m, A=torch.zeros(R, 14, dtype=F64)), m, "shape"),
        ("wrong_shape_B", with_factor(u, m, B=torch.zeros(13, R, dtype=F64)), m, "shape"),
        ("transposed", with_factor(u, m, A=f.A.mT.contiguous(), B=f.B.mT.contiguous()), m, "shape"),
        (
            "wrong_rank",
            with_factor(u, m, A=torch.zeros(R + 1, 13, dtype=F64), B=torch.zeros(7, R + 1, dtype=F64)),
            m,
            "rank",
        ),
        ("rank_mismatch", with_factor(u, m, A=torch.zeros(R + 1, 13, dtype=F64)), m, "rank"),
        ("missing_module", ClientUpload("alice", {k: v for k, v in u.factors.items() if k != m}, 3), m, "missing"),
        (
            "unexpected_module",
            ClientUpload("alice", {**u.factors, "layer9.k": u.factors["layer0.q"]}, 3),
            "layer9.k",
            "unexpected",
        ),
        ("missing_factor", with_factor(u, m, B=None), m, "factor B is missing"),
        ("int_dtype", with_factor(u, m, A=torch.zeros(R, 13, dtype=torch.int64)), m, "dtype"),
        ("three_dims", with_factor(u, m, A=torch.zeros(1, R, 13, dtype=F64)), m, "dimensions"),
    ]


@pytest.mark.parametrize(("label", "upload", "module", "fragment"), defects(), ids=[d[0] for d in defects()])
def test_check_upload_rejects(label, upload, module, fragment):
    state = make_state(SHAPES, R)
    method = build_method("fedit")
    with pytest.raises(InvalidUpdate) as err:
        check_upload(upload, state, method)
    msg = str(err.value)
    assert "alice" in msg and module in msg and fragment in msg, msg
    assert err.value.client_id == "alice" and err.value.module == module


def test_check_upload_accepts_valid_and_negative_count_rejected():
    state = make_state(SHAPES, R)
    method = build_method("fedit")
    check_upload(valid(), state, method)  # no exception
    u = valid("bob")
    bad = ClientUpload("bob", u.factors, -1)
    with pytest.raises(InvalidUpdate, match=r"client bob.*num_examples"):
        check_upload(bad, state, method)


def test_screen_uploads_splits_and_keeps_order():
    state = make_state(SHAPES, R)
    method = build_method("fedit")
    good1, good2 = valid("g1"), valid("g2")
    bads = [d[1] for d in defects()[:4]]
    for i, b in enumerate(bads):
        b.client_id = f"bad{i}"
    screening = screen_uploads([bads[0], good1, bads[1], good2, bads[2], bads[3]], state, method)
    assert [u.client_id for u in screening.accepted] == ["g1", "g2"]
    assert [e.client_id for e in screening.rejected] == ["bad0", "bad1", "bad2", "bad3"]
    assert all(e.module == "layer0.v" for e in screening.rejected)
    assert "bad0" in str(screening.rejected[0])


def test_partial_upload_methods():
    """FFA-LoRA needs only B, FedSA-LoRA only A, RoLoRA the factor of the round."""
    state = make_state(SHAPES, R)
    check_upload(valid(only=frozenset({"B"})), state, build_method("ffa_lora"))
    with pytest.raises(InvalidUpdate, match="factor B is missing"):
        check_upload(valid(only=frozenset({"A"})), state, build_method("ffa_lora"))
    check_upload(valid(only=frozenset({"A"})), state, build_method("fedsa_lora"))
    with pytest.raises(InvalidUpdate, match="factor A is missing"):
        check_upload(valid(only=frozenset({"B"})), state, build_method("fedsa_lora"))
    rolora = build_method("rolora")
    check_upload(valid(only=frozenset({"B"})), state, rolora)  # round 0: B
    state.round = 1
    check_upload(valid(only=frozenset({"A"})), state, rolora)
    with pytest.raises(InvalidUpdate, match="factor A is missing"):
        check_upload(valid(only=frozenset({"B"})), state, rolora)
    # round 0 again: a NaN in B (the factor of the round) is rejected
    state.round = 0
    u = valid(only=frozenset({"B"}))
    with pytest.raises(InvalidUpdate, match="non-finite"):
        check_upload(with_factor(u, "layer1.q", B=nan_at(u.factors["layer1.q"].B, float("nan"))), state, rolora)


def test_heterogeneous_rank_rules():
    state = make_state(SHAPES, R)
    flex, flora, fedit = build_method("flexlora"), build_method("flora"), build_method("fedit")
    low, high = valid("low", ranks=(R - 1,)), valid("high", ranks=(R + 2,))
    # fixed-rank methods: any rank but the global one is wrong
    with pytest.raises(InvalidUpdate, match=r"client low.*expected rank 2"):
        check_upload(low, state, fedit)
    # FlexLoRA: ranks up to the global rank
    check_upload(low, state, flex)
    check_upload(low, state, flex, rank=R - 1)
    with pytest.raises(InvalidUpdate, match=r"client high.*exceeds the global rank 2"):
        check_upload(high, state, flex)
    with pytest.raises(InvalidUpdate, match="exceeds the global rank"):
        check_upload(high, state, flex, rank=R + 2)
    # FLoRA: any rank, also above the global one
    check_upload(high, state, flora)
    check_upload(high, state, flora, rank=R + 2)
    # with the client's declared rank, the upload must have exactly that rank
    with pytest.raises(InvalidUpdate, match=r"client low.*expected rank 3"):
        check_upload(low, state, flora, rank=3)
    screening = screen_uploads([low, high], state, flex, ranks={"low": R - 1, "high": R + 2})
    assert [u.client_id for u in screening.accepted] == ["low"]
    assert [e.client_id for e in screening.rejected] == ["high"]
