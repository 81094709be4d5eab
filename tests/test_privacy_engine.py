"""Differential privacy in runs (``privacy.*``, fedlora/engine/privacy.py): every upload within the
clipping bound, the server's noise at its calibration (statistical tests, fixed seeds), the
methods that declare ``sum_only`` really aggregate through the mean, epsilon per round equal to
Opacus's accountant, budgets refused before a model loads, bad values refused by key, runs
reproducible from the seed and resumed identically, the bases users run."""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import replace

import pytest
import torch
from scipy import stats as sps

from fedlora.engine.client import ClientRecord, client_round
from fedlora.engine.config import ConfigError, TrainConfig, load_config
from fedlora.engine.privacy import NoisePlan, clip_upload, plan_noise, private_aggregate
from fedlora.methods import ClientUpload, GlobalState, available_methods, build_method
from fedlora.methods.base import ModuleFactors
from fedlora.privacy import global_norm
from helpers import (
    F64,
    completion_data,
    gen,
    make_state,
    make_uploads,
    module_shapes,
    randn,
    run_records,
    tiny_llama,
    tiny_lora_binding,
    tiny_run_config,
)

needs_opacus = pytest.mark.skipif(importlib.util.find_spec("opacus") is None, reason="needs opacus (privacy extra)")
SHAPES = module_shapes(24, 16)


def update_norm(start, factors, start_extras=None, extras=None) -> float:
    parts = {}
    for m, f in factors.items():
        for k in "AB":
            if f.get(k) is not None:
                parts[f"{m}{k}"] = f.get(k).double() - start[m].get(k).double()
    for k, t in (extras or {}).items():
        parts[k] = t.double() - start_extras[k].double()
    return global_norm(parts)


# ---- the client's clip -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
def test_clip_upload_bounds_the_update_and_leaves_small_ones_alone(dtype):
    g = gen(0)
    start = make_state(SHAPES, 3, seed=1, dtype=dtype).factors
    head0 = {"head.weight": randn(2, 16, g=g, dtype=dtype)}
    for scale in (1e-3, 0.3, 30.0):
        up = {m: ModuleFactors(A=f.A + scale * randn(*f.A.shape, g=g, dtype=dtype), B=None) for m, f in start.items()}
        head = {k: v + scale * randn(*v.shape, g=g, dtype=dtype) for k, v in head0.items()}
        before = update_norm(start, up, head0, head)
        factors, extras = clip_upload(start, up, head0, head, 1.0)
        after = update_norm(start, factors, head0, extras)
        assert all(f.B is None and f.A.dtype == dtype for f in factors.values())  # what was not sent stays out
        if before <= 1.0:
            assert all(torch.equal(factors[m].A, up[m].A) for m in up) or dtype != torch.float32
        else:
            assert after <= 1.0 + 4 * torch.finfo(dtype).eps and after > 0.9, (before, after)


@pytest.fixture(scope="module")
def binding():
    return tiny_lora_binding()


def plan(mode="client", sigma=1.0, clip=0.05) -> NoisePlan:
    if mode == "sample":  # client "0" (completion_data's) at sigma; another client, much noisier, sets plan.sigma
        sigmas = (("0", sigma), ("1", 100.0))
        return NoisePlan(
            mode, 100.0, clip, 1e-5, "rdp", 1.0, sample_rates=(("0", 0.25), ("1", 0.5)), sample_sigmas=sigmas
        )
    return NoisePlan(mode, sigma, clip, 1e-5, "rdp", 1.0, sample_rate=0.5)


@pytest.mark.parametrize("name", ["fedit", "ffa_lora", "fedsa_lora", "flora", "fedmomentum"])
def test_every_clients_upload_is_within_the_bound(binding, name):
    """``client_round`` under client-level DP: the update it sends (uploaded factors minus its
    start) has norm <= C; with a bound it never reaches, it sends what it sends without DP, bit
    for bit."""
    method = build_method(name)
    state = GlobalState(round=0, factors=binding.get_factors(), spec=binding.spec)
    data = completion_data()
    train = TrainConfig(lr=5e-2, max_steps=4, precision="float32")
    outs = {}
    for key, noise in (("plain", None), ("clipped", plan(clip=0.05)), ("loose", plan(clip=1e6))):
        start = method.client_start(state, _ctx(state))
        outs[key] = client_round(binding, method, state, ClientRecord(), data, train, rank=4, num_rounds=2, noise=noise)
        outs[key + "-start"] = start.factors
        binding.set_factors(state.factors)
    plain, start = outs["plain"].upload.factors, outs["plain-start"]
    assert update_norm(start, plain) > 0.05  # the bound bites
    assert update_norm(outs["clipped-start"], outs["clipped"].upload.factors) <= 0.05 * (1 + 1e-6)
    for m, f in plain.items():
        for k in "AB":
            a, b = f.get(k), outs["loose"].upload.factors[m].get(k)
            assert (a is None and b is None) or torch.equal(a, b)


def _ctx(state):
    from fedlora.methods import ClientContext

    return ClientContext(client_id="0", round=state.round, rank=state.spec.rank, seed=0)


# ---- the server's noise ----------------------------------------------------------------------------
def test_central_noise_on_the_mean_has_std_sigma_c_over_m():
    """Sum-only methods: the noised mean minus the uniform mean is N(0, (sigma C / m)^2) per
    coordinate (KS test and the sample std within 2 %, fixed seed); the same seed gives the same
    noise, another round other noise."""
    state = make_state({"w": (300, 200), "v": (200, 300)}, 8, seed=0, dtype=torch.float32)
    uploads = make_uploads(state.shapes(), [8] * 4, seed=1, dtype=torch.float32)
    p = plan(sigma=1.3, clip=0.2)
    method = build_method("fedit")
    result, _ = private_aggregate(method, state, uploads, [{}] * 4, p, seed=5)
    exact = method.aggregate(state, uploads, [1.0] * 4)
    got, ref = result.state.factors, exact.state.factors
    z = torch.cat([(got[m].get(k).double() - ref[m].get(k).double()).flatten() for m in got for k in "AB"])
    std = 1.3 * 0.2 / 4
    assert abs(float(z.std()) / std - 1) < 0.02 and abs(float(z.mean())) < 3 * std / math.sqrt(z.numel())
    assert sps.kstest((z / std).numpy(), "norm").pvalue > 1e-3
    again, _ = private_aggregate(method, state, uploads, [{}] * 4, p, seed=5)
    other, _ = private_aggregate(method, GlobalState(1, state.factors, state.spec), uploads, [{}] * 4, p, seed=5)
    assert all(torch.equal(again.state.factors[m].A, result.state.factors[m].A) for m in state.factors)
    assert not torch.equal(other.state.factors["w"].A, result.state.factors["w"].A)
    assert result.bytes_up == sum(u.nbytes() for u in uploads)


def test_methods_that_combine_factors_get_noise_on_every_upload(monkeypatch):
    """Non-sum methods (FedMomentum here): each upload reaches the method's aggregate with
    N(0, (sigma C)^2) added per coordinate, drawn from (seed, round, client)."""
    state = make_state({"w": (200, 150)}, 8, seed=0, dtype=torch.float32)
    uploads = make_uploads(state.shapes(), [8] * 3, seed=1, dtype=torch.float32)
    method = build_method("fedmomentum")
    seen = {}
    original = type(method).aggregate

    def spy(self, st, ups, weights=None):
        seen["uploads"], seen["weights"] = ups, weights
        return original(self, st, ups, weights)

    monkeypatch.setattr(type(method), "aggregate", spy)
    private_aggregate(method, state, uploads, [{}] * 3, plan(sigma=0.7, clip=0.1), seed=3)
    assert seen["weights"] == [1.0] * 3 and [u.client_id for u in seen["uploads"]] == [u.client_id for u in uploads]
    z = torch.cat(
        [
            (n.factors["w"].get(k).double() - u.factors["w"].get(k).double()).flatten()
            for n, u in zip(seen["uploads"], uploads)
            for k in "AB"
        ]
    )
    assert abs(float(z.std()) / 0.07 - 1) < 0.03 and sps.kstest((z / 0.07).numpy(), "norm").pvalue > 1e-3


@pytest.mark.parametrize("name", available_methods())
def test_sum_only_methods_aggregate_through_the_mean(name):
    """``sum_only`` is a claim the DP server step (and secure aggregation) relies on: for those
    methods, aggregating one upload equal to the weighted mean gives the same next state and
    backbone delta as the uploads themselves (float64 rounding); for the others it does not."""
    method = build_method(name)
    state = make_state(SHAPES, 3, seed=2, round_=3)  # FedRot-LoRA skips its rotation in round 0
    uploads = make_uploads(state.shapes(), [3] * 4, seed=3, only=method.uploaded_factors(state))
    w = [0.1, 0.2, 0.3, 0.4]
    mean = {
        m: ModuleFactors(
            A=sum(wi * u.factors[m].A for wi, u in zip(w, uploads)) if uploads[0].factors[m].A is not None else None,
            B=sum(wi * u.factors[m].B for wi, u in zip(w, uploads)) if uploads[0].factors[m].B is not None else None,
        )
        for m in SHAPES
    }
    a = method.aggregate(state, uploads, w)
    b = method.aggregate(state, [ClientUpload("mean", mean, 1)], [1.0])

    def same(x, y):
        for m in SHAPES:
            for k in "AB":
                if not torch.allclose(x.state.factors[m].get(k), y.state.factors[m].get(k), rtol=1e-10, atol=1e-12):
                    return False
            dx = x.backbone_delta.get(m)
            dy = y.backbone_delta.get(m)
            px = dx.dense() if dx is not None and not dx.is_empty else torch.zeros(1, dtype=F64)
            py = dy.dense() if dy is not None and not dy.is_empty else torch.zeros(1, dtype=F64)
            if px.shape != py.shape or not torch.allclose(px, py, rtol=1e-10, atol=1e-12):
                return False
        return True

    assert same(a, b) == method.sum_only(3), name


# ---- accounting and refusals --------------------------------------------------------------------
def cfg_for(tmp_path, model, name="run", **sets):
    dp = {"privacy.mode": "client", "privacy.epsilon": "8", "privacy.clip": "0.05"}
    return tiny_run_config(tmp_path, model, name, {**dp, **sets})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.mark.parametrize(
    ("sets", "key"),
    [
        ({"privacy.epsilon": "0"}, "privacy.epsilon"),
        ({"privacy.epsilon": "-1"}, "privacy.epsilon"),
        ({"privacy.epsilon": "nan"}, "privacy.epsilon"),
        ({"privacy.epsilon": "inf"}, "privacy.epsilon"),
        ({"privacy.delta": "1"}, "privacy.delta"),
        ({"privacy.delta": "1.5"}, "privacy.delta"),
        ({"privacy.delta": "0"}, "privacy.delta"),
        ({"privacy.clip": "0"}, "privacy.clip"),
        ({"privacy.clip": "-0.1"}, "privacy.clip"),
        ({"privacy.clip": "nan"}, "privacy.clip"),
        ({"privacy.noise_multiplier": "-1", "privacy.epsilon": "null"}, "privacy.noise_multiplier"),
        ({"privacy.epsilon": "null"}, "privacy.epsilon or privacy.noise_multiplier"),
        ({"privacy.mode": "sample", "method.name": "fedsmooth_lora"}, "fedsmooth_lora"),
        ({"privacy.mode": "sample", "train.packing": "flatten"}, "train.packing=flatten"),
        ({"train.scaffold": "true"}, "train.scaffold"),
        ({"privacy.mode": "local"}, "privacy.mode"),
    ],
)
def test_bad_privacy_settings_are_refused_by_key(tmp_path, sets, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cfg_for(tmp_path, tmp_path, **sets)


@needs_opacus
def test_a_budget_the_run_would_exceed_is_refused_before_the_model_loads(tmp_path, tiny, monkeypatch):
    import fedlora.engine.rounds as rounds_mod
    from fedlora.engine.local import run_experiment

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(rounds_mod, "build_binding", no_model)
    cfg = cfg_for(tmp_path, tiny, **{"privacy.noise_multiplier": "0.3", "privacy.epsilon": "1"})
    with pytest.raises(ValueError, match=r"above privacy\.epsilon=1.*privacy\.noise_multiplier"):
        run_experiment(cfg, progress=False)
    with pytest.raises(ValueError, match=r"privacy\.epsilon=1e-09"):
        run_experiment(cfg_for(tmp_path, tiny, **{"privacy.epsilon": "1e-9"}), progress=False)


@needs_opacus
def test_epsilon_per_round_is_the_accountants_and_a_resumed_run_is_identical(tmp_path, tiny):
    """3 rounds at once vs 2 then ``--resume`` (a given noise multiplier): the same records (noise
    from the seed), the spend in the checkpoint; each round's epsilon is Opacus's for
    (sigma, q = k/N, t rounds). A resume that extends a budget-calibrated run past its budget is
    refused."""
    from opacus.accountants import RDPAccountant

    from fedlora.engine.checkpoint import load_checkpoint
    from fedlora.engine.local import run_experiment

    sets = {"privacy.epsilon": "null", "privacy.noise_multiplier": "0.9"}
    whole = run_experiment(cfg_for(tmp_path, tiny, "whole", **sets), progress=False)
    run_experiment(cfg_for(tmp_path, tiny, "split", **sets, **{"rounds.num_rounds": "2"}), progress=False)
    split = run_experiment(cfg_for(tmp_path, tiny, "split", **sets), resume=True, progress=False)
    a, b = run_records(tmp_path / "whole"), run_records(tmp_path / "split")
    b[1].pop("eval")
    for r in a[:2] + b[:2]:  # what the whole run planned to spend: 3 rounds' epsilon, the split run's first part 2
        r["privacy"].pop("planned_epsilon")
    assert a == b and whole["privacy"] == split["privacy"]
    for t, r in enumerate(a, start=1):
        acc = RDPAccountant()
        for _ in range(t):
            acc.step(noise_multiplier=0.9, sample_rate=2 / 4)
        assert r["privacy"]["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    ka, kb = load_checkpoint(tmp_path / "whole" / "checkpoint"), load_checkpoint(tmp_path / "split" / "checkpoint")
    assert ka["privacy"] == kb["privacy"] and ka["privacy"]["parties"]["clients"] == [[0.9, 0.5, 3]]
    for m in ka["factors"]:
        assert torch.equal(ka["factors"][m]["A"], kb["factors"][m]["A"])

    # a budget-calibrated run: 2 rounds spend the budget; resumed to 4 rounds, sigma would be
    # recalibrated for 4 but the first two ran at the 2-round sigma: refused, naming the keys
    run_experiment(cfg_for(tmp_path, tiny, "budget", **{"rounds.num_rounds": "2"}), progress=False)
    with pytest.raises(ValueError, match=r"privacy\.epsilon=8.*rounds\.num_rounds"):
        run_experiment(cfg_for(tmp_path, tiny, "budget", **{"rounds.num_rounds": "4"}), resume=True, progress=False)


@needs_opacus
def test_plan_calibrates_sigma_to_the_budget_for_each_mode():
    from fedlora.configs import preset_path
    from fedlora.privacy import epsilon

    sizes = {"0": 10, "1": 20, "2": 40, "3": 30}
    common = {"privacy.epsilon": "3", "partition.num_clients": "4", "rounds.num_rounds": "10", "method.name": "fedit"}
    cfg = load_config(preset_path("ci"), {**common, "privacy.mode": "client", "rounds.clients_per_round": "2"})
    p = plan_noise(cfg, sizes)
    assert p.sample_rate == 0.5 and 2.9 < epsilon(p.sigma, 0.5, 10, 1e-5) <= 3.0
    sample = {"privacy.mode": "sample", "train.batch_size": "2", "train.max_steps": "5"}
    cfg = load_config(preset_path("ci"), {**common, **sample})
    p = plan_noise(cfg, sizes)
    assert dict(p.sample_rates) == {"0": 0.2, "1": 0.1, "2": 0.05, "3": 2 / 30}
    for cid, q in p.sample_rates:  # each client at its own rate, every round: 10 x 5 steps
        assert 2.9 < epsilon(p.sigma_of(cid), q, 50, 1e-5) <= 3.0
    assert p.sigma == p.sigma_of("0") and 2.9 < p.planned_epsilon <= 3.0  # the largest: the smallest client's


SIZES = {"a": 16, "b": 64, "c": 256}


def sample_plan(train: dict[str, str], **sets: str):
    from fedlora.configs import preset_path

    common = {"privacy.mode": "sample", "privacy.epsilon": "8", "partition.num_clients": "3"}
    common |= {"rounds.num_rounds": "10", "method.name": "fedit", "train.batch_size": "4", **train}
    cfg = load_config(preset_path("ci"), {**common, **sets})
    return cfg, plan_noise(cfg, SIZES)


@needs_opacus
@pytest.mark.parametrize(
    "train",
    [{"train.max_steps": "3"}, {"train.max_steps": "0", "train.epochs": "1"}],
    ids=["max_steps", "epochs"],
)
def test_sample_mode_calibrates_each_client_to_its_own_size(train):
    """Each client its own party: sigma_i from privacy.epsilon at its own q_i = B / n_i and its own
    rounds x K_i steps, so a larger client gets less noise and every client is planned just under
    the budget; the smallest client's sigma is the single worst-case calibration (what every
    client got before), and the plan's sigma (reports) is the largest."""
    from fedlora.engine.train import steps_for
    from fedlora.privacy import epsilon, noise_multiplier_for

    cfg, p = sample_plan(train)
    steps = {cid: steps_for(cfg.train, n) for cid, n in SIZES.items()}
    assert dict(p.sample_steps) == steps and dict(p.sample_rates) == {c: 4 / n for c, n in SIZES.items()}
    sigmas = [p.sigma_of(c) for c in ("a", "b", "c")]
    assert sigmas[0] > sigmas[1] > sigmas[2] > 0
    spent = {c: epsilon(p.sigma_of(c), 4 / n, 10 * steps[c], 1e-5) for c, n in SIZES.items()}
    assert all(0.95 * 8 <= e <= 8 for e in spent.values()), spent
    assert p.planned_epsilon == pytest.approx(max(spent.values()), rel=1e-12)
    worst_case = noise_multiplier_for(8, 1e-5, 4 / 16, 10 * steps_for(cfg.train, 16))
    assert p.sigma_of("a") == worst_case == p.sigma
    assert p.report()["noise_multiplier"] == sigmas[0] and p.report()["noise_multiplier_min"] == sigmas[2]


@needs_opacus
def test_a_given_noise_multiplier_is_every_clients_and_the_budget_covers_the_worst():
    from fedlora.privacy import epsilon

    cfg, p = sample_plan({"train.max_steps": "3"}, **{"privacy.epsilon": "null", "privacy.noise_multiplier": "1.2"})
    assert {c: p.sigma_of(c) for c in SIZES} == dict.fromkeys(SIZES, 1.2) and p.sigma == 1.2
    assert p.report()["noise_multiplier_min"] == 1.2
    spent = {c: epsilon(1.2, 4 / n, 30, 1e-5) for c, n in SIZES.items()}
    assert p.planned_epsilon == pytest.approx(spent["a"], rel=1e-12) and spent["a"] == max(spent.values())
    # a sigma enough for the two larger clients but not the smallest: refused, naming the keys
    between = (spent["a"] + spent["b"]) / 2
    with pytest.raises(ValueError, match=r"above privacy\.epsilon.*privacy\.noise_multiplier"):
        sample_plan({"train.max_steps": "3"}, **{"privacy.epsilon": f"{between}", "privacy.noise_multiplier": "1.2"})


@needs_opacus
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
@pytest.mark.parametrize(("quantization", "dtype"), [("none", "bfloat16"), ("nf4", "bfloat16")])
def test_client_level_dp_runs_on_the_bases_users_run(tmp_path, tiny, quantization, dtype):
    from fedlora.engine.local import run_experiment

    for name in ("fedit", "fedmomentum"):
        sets = {"method.name": name, "model.quantization": quantization, "model.dtype": dtype, "rounds.num_rounds": "2"}
        cfg = cfg_for(tmp_path, tiny, f"{name}-{quantization}", **sets)
        summary = run_experiment(cfg, progress=False)
        assert summary["privacy"]["epsilon"] <= 8.0 and summary["rounds"] == 2
        assert all(math.isfinite(s["loss"]) for r in run_records(tmp_path / cfg.name) for s in r["train"].values())


# ---- sample-level DP (DP-SGD inside client_round) -------------------------------------------------
@needs_opacus
def test_dp_sgd_steps_are_clipped_and_noised_from_the_seed(binding):
    """SGD without momentum: each DP-SGD step moves the trained factors by lr * g~ with ||g~|| <= C
    when there is no noise (the mean of clipped per-example gradients), so K steps move them by at
    most K lr C; noise from (seed, round, client): the same again, another round differs. The
    client's own noise multiplier (``sigma_of``), not the plan's largest (another client's)."""
    method = build_method("fedit")
    state = GlobalState(round=0, factors=binding.get_factors(), spec=binding.spec)
    data = completion_data()
    train = TrainConfig(optimizer="sgd", lr=0.5, max_steps=3, clip=0.0, precision="float32")

    def run(noise, round_=0):
        st = GlobalState(round=round_, factors=state.factors, spec=state.spec)
        out = client_round(binding, method, st, ClientRecord(), data, train, rank=4, num_rounds=2, noise=noise)
        binding.set_factors(state.factors)
        return out

    plain = run(None)
    clipped = run(plan("sample", sigma=0.0, clip=1e-3))
    moved = update_norm(state.factors, clipped.upload.factors)
    assert 0 < moved <= 3 * 0.5 * 1e-3 * (1 + 1e-4) < update_norm(state.factors, plain.upload.factors)
    a, b = run(plan("sample", sigma=1.0, clip=1e-3)), run(plan("sample", sigma=1.0, clip=1e-3))
    c = run(plan("sample", sigma=1.0, clip=1e-3), round_=1)
    m = next(iter(state.factors))
    assert torch.equal(a.upload.factors[m].A, b.upload.factors[m].A)
    assert not torch.equal(a.upload.factors[m].A, c.upload.factors[m].A)
    assert update_norm(state.factors, a.upload.factors) > 10 * moved  # the noise dominates a tiny clip
    with pytest.raises(KeyError):  # a client the plan does not know gets no other client's noise
        run(replace(plan("sample", sigma=1.0, clip=1e-3), sample_sigmas=(("1", 1.0),)))


@needs_opacus
def test_sample_level_epsilon_is_each_clients_own_and_resumes_identically(tmp_path, tiny):
    """Each client's DP-SGD at its own sigma_i (calibrated to privacy.epsilon at its own size) and
    its epsilon from its own participation (rounds it trained x steps at B / n_i, at sigma_i): per
    client in metrics.jsonl and the checkpoint's ledger, the run's the largest, within
    privacy.epsilon; 1 round then --resume equals 2 at once (a given noise multiplier)."""
    from opacus.accountants import RDPAccountant

    from fedlora.engine.checkpoint import load_checkpoint
    from fedlora.engine.local import run_experiment
    from fedlora.engine.setup import prepare_data
    from fedlora.privacy import noise_multiplier_for

    def check_spend(lines, sigma_of, sizes):
        taken: dict[str, int] = {}
        for r in lines:
            for cid, s in r["train"].items():
                taken[cid] = taken.get(cid, 0) + s["steps"]
            ref = {}
            for cid, steps in taken.items():
                acc = RDPAccountant()
                for _ in range(steps):
                    acc.step(noise_multiplier=sigma_of[cid], sample_rate=min(1.0, 2 / sizes[cid]))  # ci: batch 2
                ref[cid] = acc.get_epsilon(1e-5)
            assert r["privacy"]["epsilon_per_client"] == pytest.approx(ref, rel=1e-9)
            assert r["privacy"]["epsilon"] == pytest.approx(max(ref.values()), rel=1e-9)
        return taken

    sets = {"privacy.mode": "sample", "privacy.epsilon": "6", "privacy.clip": "1.0", "rounds.num_rounds": "2"}
    cfg = cfg_for(tmp_path, tiny, "whole", **sets)
    run_experiment(cfg, progress=False)
    lines = run_records(tmp_path / "whole")
    sizes = prepare_data(cfg).sizes
    assert len(set(sizes.values())) > 1  # clients of different sizes: their sigmas differ
    # each client's sigma, calibrated independently: its own rate, 2 rounds x 2 steps (ci: max_steps 2)
    sigma_of = {cid: noise_multiplier_for(6, 1e-5, min(1.0, 2 / n), 2 * 2) for cid, n in sizes.items()}
    smallest = min(sizes, key=sizes.get)
    assert lines[0]["privacy"]["noise_multiplier"] == sigma_of[smallest] == max(sigma_of.values())
    assert lines[0]["privacy"]["noise_multiplier_min"] == min(sigma_of.values()) < sigma_of[smallest]
    taken = check_spend(lines, sigma_of, sizes)
    assert lines[-1]["privacy"]["epsilon"] <= 6.0
    parties = load_checkpoint(tmp_path / "whole" / "checkpoint")["privacy"]["parties"]
    assert {c: sum(h[2] for h in parties[c]) for c in parties} == taken
    assert all(h[0] == sigma_of[c] and h[1] == min(1.0, 2 / sizes[c]) for c in parties for h in parties[c])

    fixed = {**sets, "privacy.epsilon": "null", "privacy.noise_multiplier": "0.9"}  # every client at one sigma
    run_experiment(cfg_for(tmp_path, tiny, "again", **fixed), progress=False)
    run_experiment(cfg_for(tmp_path, tiny, "split", **{**fixed, "rounds.num_rounds": "1"}), progress=False)
    run_experiment(cfg_for(tmp_path, tiny, "split", **fixed), resume=True, progress=False)
    again, split = run_records(tmp_path / "again"), run_records(tmp_path / "split")
    split[0].pop("eval")
    for r in again + split:
        r["privacy"].pop("planned_epsilon")
    assert again == split  # the same noise, from the seed
    assert again[0]["privacy"]["noise_multiplier"] == again[0]["privacy"]["noise_multiplier_min"] == 0.9
    check_spend(again, dict.fromkeys(sizes, 0.9), sizes)


@needs_opacus
def test_fedlora_run_prints_the_spend(tmp_path, tiny, capsys):
    from fedlora.cli import main

    sets = ["rounds.num_rounds=1", "rounds.eval_baseline=false", "method.name=ffa_lora", "privacy.mode=client"]
    sets += ["privacy.epsilon=5", f"model.name={tiny}", f"output_dir={tmp_path}", "name=cli", "train.max_steps=1"]
    sets += ["task.settings={n_train: 24, n_test: 2, max_new_tokens: 4, max_length: 64}"]
    assert main(["run", "--preset", "ci", "--no-progress", *[x for s in sets for x in ("--set", s)]]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert f"privacy: client-level DP, epsilon {summary['privacy']['epsilon']:.3g} at delta 1e-05 (rdp;" in out
