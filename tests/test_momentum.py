"""The momentum diagnostics (engine/momentum.py) against dense float64 references: the global
update, its cosine with the last one, the path efficiency, the aggregation error (exact methods at
rounding, FedIT at its known gap), the exact re-factoring of the backbone sum, and a resume through
a real checkpoint that gives bit-identical numbers."""

from __future__ import annotations

import math

import pytest
import torch

from fedlora.engine.checkpoint import load_checkpoint, save_checkpoint
from fedlora.engine.momentum import MomentumTracker, initial_tracker
from fedlora.lowrank import FactoredDelta
from fedlora.methods import ClientUpload, GlobalState, ModuleFactors, build_method
from fedlora.methods.base import aggregation_weights
from helpers import F64, gen, make_state, make_uploads, randn

SHAPES = {"l0.q": (9, 6), "l0.v": (6, 9), "l1.q": (9, 6)}
RANK = 2


def dense_lora(state: GlobalState) -> dict[str, torch.Tensor]:
    s = state.spec.scale()
    return {m: s * (f.B.to(F64) @ f.A.to(F64)) for m, f in state.factors.items()}


def vec(mats: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([mats[m].flatten() for m in sorted(mats)])


def random_round(state: GlobalState, seed: int, backbone_rank: int = 1):
    """A synthetic round: next state (random factors), a random backbone delta, three uploads."""
    g = gen(seed)
    after = make_state(SHAPES, RANK, round_=state.round + 1, seed=seed)
    deltas = {
        m: FactoredDelta.from_factors(randn(d_out, backbone_rank, g=g), randn(backbone_rank, d_in, g=g))
        for m, (d_out, d_in) in SHAPES.items()
        if m != "l0.v"  # one module without a backbone delta
    }
    uploads = make_uploads(SHAPES, [RANK] * 3, seed=seed + 1)
    return after, deltas, uploads


class DenseReference:
    """The same diagnostics with dense float64 matrices."""

    def __init__(self, start: GlobalState) -> None:
        self.start = vec(dense_lora(start))
        self.backbone = torch.zeros_like(self.start)
        self.previous: torch.Tensor | None = None
        self.length = 0.0

    def observe(self, before, after, deltas, uploads):
        zero = {m: torch.zeros(*SHAPES[m], dtype=F64) for m in SHAPES}
        bb = vec({**zero, **{m: d.dense() for m, d in deltas.items()}})
        update = bb + vec(dense_lora(after)) - vec(dense_lora(before))
        self.backbone += bb
        self.length += float(update.norm())
        path = self.backbone + vec(dense_lora(after)) - self.start
        p = aggregation_weights(uploads)
        s = before.spec.scale()
        mean = sum(pi * s * vec({m: f.B @ f.A for m, f in u.factors.items()}) for pi, u in zip(p, uploads))
        exact = mean - vec(dense_lora(before))
        cosine = None
        if self.previous is not None:
            cosine = float(update @ self.previous) / float(update.norm() * self.previous.norm())
        self.previous = update
        return {
            "update_norm": float(update.norm()),
            "update_cosine": cosine,
            "path_efficiency": float(path.norm()) / self.length,
            "aggregation_error": float((update - exact).norm() / exact.norm()),
            "client_update_norm": float(exact.norm()),
        }


def test_every_number_matches_the_dense_float64_reference_over_rounds():
    fedit = build_method("fedit")
    state = make_state(SHAPES, RANK, seed=100)
    tracker, ref = initial_tracker(state.factors), DenseReference(state)
    for t in range(5):
        after, deltas, uploads = random_round(state, seed=10 * t + 3)
        got = tracker.observe(fedit, state, after, deltas, uploads)
        want = ref.observe(state, after, deltas, uploads)
        for k, v in want.items():
            assert (got[k] is None) == (v is None), k
            if v is not None:
                assert got[k] == pytest.approx(v, rel=1e-10), (t, k)
        state = after
    assert tracker.backbone["l0.q"].rank == 5 and "l0.v" not in tracker.backbone


def _round_of(method, state, uploads):
    result = method.aggregate(state, uploads)
    return result.state, {m: d for m, d in result.backbone_delta.items() if not d.is_empty}


@pytest.mark.parametrize(
    ("name", "settings", "only"),
    [
        ("fedex_lora", {}, None),
        ("flora", {}, None),
        ("fedmomentum", {"tau": 1.0}, None),
        ("ffa_lora", {}, frozenset({"B"})),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_exact_methods_have_no_aggregation_error(name, settings, only, dtype):
    """The exact fixes put ``sum_i p_i s B_i A_i`` into the model: the error is rounding of the
    factors' dtype, whichever part (LoRA, backbone) holds it. FFA-LoRA's clients send B only:
    their update is completed with the global A they trained against."""
    method = build_method(name, settings)
    state = make_state(SHAPES, RANK, seed=5, dtype=dtype, zero_b=name == "flora")
    uploads = make_uploads(SHAPES, [RANK] * 4, seed=6, dtype=dtype, only=only)
    tracker = initial_tracker(state.factors)
    after, deltas = _round_of(method, state, uploads)
    out = tracker.observe(method, state, after, deltas, uploads)
    assert out["aggregation_error"] < (1e-12 if dtype == torch.float64 else 1e-5)
    assert out["update_norm"] == pytest.approx(out["client_update_norm"], rel=1e-5)


def test_fedit_reports_the_gap_of_separate_averaging():
    fedit = build_method("fedit")
    state = make_state(SHAPES, RANK, seed=5)
    uploads = make_uploads(SHAPES, [RANK] * 4, seed=6)
    after, deltas = _round_of(fedit, state, uploads)
    out = initial_tracker(state.factors).observe(fedit, state, after, deltas, uploads)
    p, s = aggregation_weights(uploads), state.spec.scale()
    gap, exact = [], []
    for m, f in state.factors.items():
        mean_b = sum(pi * u.factors[m].B for pi, u in zip(p, uploads))
        mean_a = sum(pi * u.factors[m].A for pi, u in zip(p, uploads))
        mean_ba = sum(pi * u.factors[m].B @ u.factors[m].A for pi, u in zip(p, uploads))
        gap.append(s * (mean_b @ mean_a - mean_ba))
        exact.append(s * (mean_ba - f.B @ f.A))
    want = math.sqrt(sum(float(g.square().sum()) for g in gap) / sum(float(e.square().sum()) for e in exact))
    assert want > 0.1
    assert out["aggregation_error"] == pytest.approx(want, rel=1e-10)


def test_fedmomentum_reports_its_energy_split_and_the_dropped_part_as_its_error():
    method = build_method("fedmomentum", {"tau": 0.9})
    state = make_state(SHAPES, RANK, seed=5, zero_b=True)  # round 1: the change is M itself
    uploads = make_uploads(SHAPES, [RANK] * 4, seed=6)
    result = method.aggregate(state, uploads)
    out = initial_tracker(state.factors).observe(
        method, state, result.state, result.backbone_delta, uploads, result.report
    )
    e = out["energy"]
    assert e["kept"] + e["merged"] + e["dropped"] == pytest.approx(1.0, abs=1e-9)
    assert e["merged"] > 0 and 0 < e["dropped"] <= 0.1 + 1e-12
    assert e["dropped_of_change"] == pytest.approx(e["dropped"], rel=1e-9)  # B^0 = 0
    # what FedMomentum leaves out of the model is exactly what it drops, module by module
    dropped = [r["dropped_energy"] for r in result.report.values()]
    assert 0 < out["aggregation_error"] <= math.sqrt(max(dropped)) + 1e-9


def test_fedsa_clients_updates_are_unknown_to_the_server():
    method = build_method("fedsa_lora")
    state = make_state(SHAPES, RANK, seed=5)
    uploads = make_uploads(SHAPES, [RANK] * 2, seed=6, only=frozenset({"A"}))
    after, deltas = _round_of(method, state, uploads)
    out = initial_tracker(state.factors).observe(method, state, after, deltas, uploads)
    assert out["aggregation_error"] is None and out["client_update_norm"] is None
    assert out["update_norm"] > 0  # the global A moved


def _state_with_b(base: GlobalState, B: dict[str, torch.Tensor], round_: int) -> GlobalState:
    factors = {m: ModuleFactors(A=f.A, B=B[m]) for m, f in base.factors.items()}
    return GlobalState(round_, factors, base.spec)


def test_a_straight_path_has_efficiency_one_and_a_reversal_cosine_minus_one():
    fedit = build_method("fedit")
    state = make_state(SHAPES, RANK, seed=1, zero_b=True)
    step = {m: randn(d_out, RANK, g=gen(2)) for m, (d_out, _) in SHAPES.items()}
    tracker = initial_tracker(state.factors)
    states = [state]
    for t, k in enumerate([1, 2, 3]):  # B grows along one direction: every update the same
        states.append(_state_with_b(state, {m: k * b for m, b in step.items()}, t + 1))
        out = tracker.observe(fedit, states[-2], states[-1], {}, [])
        assert out["path_efficiency"] == pytest.approx(1.0, rel=1e-12)
    assert out["update_cosine"] == pytest.approx(1.0, rel=1e-12)
    assert out["aggregation_error"] is None  # no uploads
    states.append(_state_with_b(state, {m: 2 * b for m, b in step.items()}, 4))  # one step back
    out = tracker.observe(fedit, states[-2], states[-1], {}, [])
    assert out["update_cosine"] == pytest.approx(-1.0, rel=1e-12)
    assert out["path_efficiency"] == pytest.approx(2 / 4, rel=1e-12)  # |sum| 2 steps, length 4
    skipped = tracker.skip()
    assert skipped["update_norm"] == 0.0 and skipped["update_cosine"] is None
    assert skipped["path_efficiency"] == pytest.approx(0.5, rel=1e-12)
    out = tracker.observe(fedit, states[-1], states[-2], {}, [])
    assert out["update_cosine"] is None  # the last update was zero: no direction to compare


def test_the_backbone_sum_is_refactored_exactly_when_its_rank_passes_the_layer_size():
    fedit = build_method("fedit")
    state = make_state(SHAPES, RANK, seed=100)
    tracker, ref = initial_tracker(state.factors), DenseReference(state)
    for t in range(4):  # rank 4 per round into 9x6 layers: L passes rank 6 in round 2
        after, deltas, uploads = random_round(state, seed=t + 50, backbone_rank=4)
        got = tracker.observe(fedit, state, after, deltas, uploads)
        want = ref.observe(state, after, deltas, uploads)
        assert got["path_efficiency"] == pytest.approx(want["path_efficiency"], rel=1e-9)
        assert tracker.backbone["l0.q"].rank <= 6 + 4
        state = after
    assert tracker.backbone["l0.q"].rank <= 6


def test_a_resume_through_a_checkpoint_writes_the_same_numbers(tmp_path):
    fedit = build_method("fedit")
    first = make_state(SHAPES, RANK, seed=100, dtype=torch.float32)
    rounds, state = [], first
    for t in range(6):
        after, deltas, uploads = random_round(state, seed=t + 70, backbone_rank=3)
        after = GlobalState(after.round, {m: f.to(torch.float32) for m, f in after.factors.items()}, after.spec)
        uploads = [
            ClientUpload(u.client_id, {m: f.to(torch.float32) for m, f in u.factors.items()}, u.num_examples)
            for u in uploads
        ]
        deltas = {m: FactoredDelta.from_factors(*d.factors(torch.float32)) for m, d in deltas.items()}
        rounds.append((state, after, deltas, uploads))
        state = after

    whole = initial_tracker(first.factors)
    straight = [whole.observe(fedit, *r) for r in rounds]
    part = initial_tracker(first.factors)
    head = [part.observe(fedit, *r) for r in rounds[:3]]
    save_checkpoint(tmp_path / "ck", {"momentum": part.to_tree()})
    ledger = [r[2] for r in rounds[:3]]
    resumed = MomentumTracker.from_tree(load_checkpoint(tmp_path / "ck")["momentum"], ledger)
    tail = [resumed.observe(fedit, *r) for r in rounds[3:]]
    assert head + tail == straight  # bit-identical, not approximately equal

    # a checkpoint from before the last update's norm was carried: the norm is recomputed from its
    # factors (Gram sums: the same number up to float64 rounding), and the run goes on
    old = load_checkpoint(tmp_path / "ck")["momentum"]
    del old["previous_norm"]
    legacy = MomentumTracker.from_tree(old, ledger)
    assert legacy.previous_norm == pytest.approx(part.previous_norm, rel=1e-12) and legacy.previous_norm > 0
    again = [legacy.observe(fedit, *r) for r in rounds[3:]]
    assert again[-1]["path_efficiency"] == pytest.approx(straight[-1]["path_efficiency"], rel=1e-12)
    assert again[0]["update_cosine"] == pytest.approx(straight[3]["update_cosine"], rel=1e-9)
