"""SCAFFOLD (``train.scaffold``, fedlora/methods/scaffold.py): the server's and the clients' control
variates against dense float64 references and the paper's invariant ``c = mean_i c_i``; which
factors each method controls; the local step is the paper's SGD step; refusals by key; a run
resumes identically with the variates checkpointed; the bases users run (bf16, nf4)."""

from __future__ import annotations

import importlib.util
import math
import random

import pytest
import torch

from fedlora.engine.client import ClientRecord, causal_or_cls_loss, client_round
from fedlora.engine.config import ConfigError, TrainConfig, load_config
from fedlora.methods import ClientContext, ClientUpload, GlobalState, available_methods, build_method
from fedlora.methods.base import ModuleFactors
from fedlora.methods.scaffold import CLIENT, SERVER, Scaffold, check_scaffold
from fedlora.methods.server_opt import factor_averaging_methods
from helpers import (
    F64,
    assert_close,
    completion_data,
    gen,
    make_state,
    module_shapes,
    randn,
    run_records,
    tiny_llama,
    tiny_lora_binding,
    tiny_run_config,
)

SHAPES = module_shapes(9, 5)


def moved(state: GlobalState, which: frozenset[str], g: torch.Generator) -> dict[str, ModuleFactors]:
    """A client's 'trained' factors: the global ones plus noise on ``which``."""
    out = {}
    for m, f in state.factors.items():
        A = f.A + randn(*f.A.shape, g=g) if "A" in which else None
        B = f.B + randn(*f.B.shape, g=g) if "B" in which else None
        out[m] = ModuleFactors(A=A, B=B)
    return out


def client(method: Scaffold, state: GlobalState, cid: str, memory: dict, step_size: float, g: torch.Generator):
    """One client's round through the wrapper's hooks (training replaced by noise)."""
    ctx = ClientContext(client_id=cid, round=state.round, rank=state.spec.rank, memory=memory, step_size=step_size)
    start = method.client_start(state, ctx)
    trained = {
        m: ModuleFactors(
            A=f.A + randn(*f.A.shape, g=g) if "A" in start.trainable else f.A,
            B=f.B + randn(*f.B.shape, g=g) if "B" in start.trainable else f.B,
        )
        for m, f in start.factors.items()
    }
    factors, memory = method.client_finish(state, ctx, start, trained)
    return start, ClientUpload(cid, factors, num_examples=3 + int(cid), step_size=step_size), memory


def controls(tensors: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def test_server_update_matches_the_dense_float64_reference():
    """``c+ = c + (1/N) sum_i ((x - y_i) / S_i - c)`` over the uploads with ``S_i > 0``, written
    out here module by module; the factors are FedIT's aggregate bit for bit."""
    g = gen(1)
    state = make_state(SHAPES, 3, seed=2)
    c = {f"{m}/{k}": randn(*state.factors[m].get(k).shape, g=g) for m in SHAPES for k in "AB"}
    state.method_state = {SERVER + k: v for k, v in c.items()}
    steps = [0.03, 0.5, 0.0, 1.7]  # the third learned nothing: it counts for neither variate
    uploads = [ClientUpload(str(i), moved(state, frozenset("AB"), g), 2 + i, s) for i, s in enumerate(steps)]
    method = Scaffold(build_method("fedit"), num_clients=7)
    result = method.aggregate(state, uploads)
    plain = build_method("fedit").aggregate(GlobalState(0, state.factors, state.spec), uploads)
    for m in SHAPES:
        assert torch.equal(result.state.factors[m].A, plain.state.factors[m].A)
        assert torch.equal(result.state.factors[m].B, plain.state.factors[m].B)
    new = controls(result.state.method_state, SERVER)
    assert sorted(new) == sorted(c)
    for key, old in c.items():
        m, _, k = key.rpartition("/")
        x = state.factors[m].get(k)
        ref = old.clone()
        for u, s in zip(uploads, steps):
            if s > 0:
                ref = ref + ((x - u.factors[m].get(k)) / s - old) / 7
        assert_close(new[key], ref, 1e-13, key)
    c_bytes = sum(t.numel() * t.element_size() for t in new.values())
    assert result.bytes_down == plain.bytes_down + c_bytes  # c goes down with the factors
    assert result.bytes_up == plain.bytes_up  # and nothing extra comes up


@pytest.mark.parametrize("name", ["fedit", "ffa_lora", "rolora", "fedsa_lora", "fedrot_lora"])
def test_the_server_variate_stays_the_mean_of_all_clients_variates(name):
    """The paper's invariant ``c = (1/N) sum_i c_i`` (over all N clients, trained or not), with
    partial participation over six rounds; each client's own update is ``c_i - c + (x - y_i)/S_i``;
    the factors are the plain method's; only the method's averaged, uploaded factors have variates."""
    n, g, rng = 5, gen(3), random.Random(0)
    method, plain = Scaffold(build_method(name), n), build_method(name)
    state = make_state(SHAPES, 2, seed=4)
    memories: dict[str, dict] = {str(i): {} for i in range(n)}
    if name == "fedsa_lora":  # its own B lives in the memory, beside c_i
        memories = {cid: {f"{m}.B": randn(*f.B.shape, g=g) for m, f in state.factors.items()} for cid in memories}
    seen: set[str] = set()
    for t in range(6):
        which = method.controlled(state)
        seen |= which
        assert which == plain.averaged_factors(t) & plain.uploaded_factors(state)
        sampled = sorted(rng.sample(sorted(memories), 3))
        uploads = []
        for cid in sampled:
            old = controls(memories[cid], CLIENT)
            start, upload, memory = client(method, state, cid, memories[cid], 0.1 * (1 + int(cid)), g)
            c = controls(state.method_state, SERVER)
            assert set(start.correction) <= set(SHAPES)
            for m, f in start.correction.items():  # c - c_i, on the controlled factors only
                for k in "AB":
                    d = f.get(k)
                    if k not in which:
                        assert d is None
                    elif d is not None:
                        zero = torch.zeros_like(d)
                        assert_close(d, c.get(f"{m}/{k}", zero) - old.get(f"{m}/{k}", zero), 1e-15, "correction")
            new = controls(memory, CLIENT)
            for key, v in new.items():
                m, _, k = key.rpartition("/")
                x, y = state.factors[m].get(k), upload.factors[m].get(k)
                zero = torch.zeros_like(x)
                if k in which:
                    ref = old.get(key, zero) - c.get(key, zero) + (x - y) / upload.step_size
                    assert_close(v, ref, 1e-13, key)
                else:
                    assert torch.equal(v, old[key])  # rolora: the waiting factor's variate is kept
            assert {key.rpartition("/")[2] for key in new} >= which
            if name == "fedsa_lora":
                assert all(f"{m}.B" in memory for m in SHAPES)  # the method's own memory kept
            memories[cid] = memory
            uploads.append(upload)
        result = method.aggregate(state, uploads)
        expect = plain.aggregate(GlobalState(state.round, state.factors, state.spec), uploads)
        for m in SHAPES:
            for k in "AB":
                assert torch.equal(result.state.factors[m].get(k), expect.state.factors[m].get(k))
        state = result.state
        c = controls(state.method_state, SERVER)
        for key, v in c.items():
            total = sum(controls(mem, CLIENT).get(key, torch.zeros_like(v)) for mem in memories.values())
            assert_close(v, total / n, 1e-12, f"round {t}: {key}")
        assert {key.rpartition("/")[2] for key in c} == seen  # rolora: A, then B too (alternating)
    assert seen == ({"A", "B"} if name in ("fedit", "fedrot_lora", "rolora") else {"B" if name == "ffa_lora" else "A"})
    if name == "fedsa_lora":  # the client's own model is still its B and the global A
        personal = method.personal_factors(state, memories["0"])
        first = next(iter(SHAPES))
        assert personal is not None and torch.equal(personal[first].B, memories["0"][f"{first}.B"])


def test_only_factor_averaging_methods_combine_and_the_error_names_the_key(tmp_path):
    from fedlora.configs import preset_path

    allowed = set(factor_averaging_methods())
    assert allowed == {"fedit", "ffa_lora", "rolora", "fedsa_lora", "fedrot_lora"}
    for name in available_methods():
        if name in allowed:
            check_scaffold(build_method(name))
            continue
        with pytest.raises(ConfigError, match=r"train\.scaffold is not defined for method " + name) as err:
            load_config(preset_path("ci"), {"method.name": name, "train.scaffold": "true"})
        assert "fedit" in str(err.value)
    with pytest.raises(ConfigError, match=r"train\.scaffold needs train\.lr > 0"):
        load_config(preset_path("ci"), {"method.name": "fedit", "train.scaffold": "true", "train.lr": "0"})


# ---- the local step, on a real model -------------------------------------------------------------


@pytest.fixture(scope="module")
def binding():
    return tiny_lora_binding()


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_the_local_step_is_the_papers_sgd_step(binding, schedule):
    """Plain SGD (no momentum, clipping or weight decay): ``client_round`` with SCAFFOLD follows
    ``y <- y - eta_k (grad f_i(y) + c - c_i)``, computed here by hand on the same batches; the
    client's new variate is ``c_i - c + (x - y) / sum_k eta_k``."""
    from fedlora.engine.train import lr_at

    g = gen(5)
    state = GlobalState(round=1, factors=binding.get_factors(), spec=binding.spec)
    c = {
        f"{m}/{k}": 0.3 * randn(*f.get(k).shape, g=g, dtype=torch.float32)
        for m, f in state.factors.items()
        for k in "AB"
    }
    c_i = {k: 0.3 * randn(*v.shape, g=g, dtype=torch.float32) for k, v in c.items()}
    state.method_state = {SERVER + k: v for k, v in c.items()}
    record = ClientRecord(memory={CLIENT + k: v for k, v in c_i.items()})
    data = completion_data()
    train = TrainConfig(optimizer="sgd", lr=0.3, max_steps=5, clip=0.0, precision="float32", schedule=schedule)
    method = Scaffold(build_method("fedit"), num_clients=4)
    out = client_round(binding, method, state, record, data, train, rank=4, num_rounds=3)

    binding.set_factors(state.factors)  # by hand, from the same start
    params = binding.set_trainable(frozenset("AB"))
    named = {(m, k): binding.factor_parameter(m, k) for m in state.factors for k in "AB"}
    torch.manual_seed(0)
    batches = data.batches(0)
    lrs = []
    binding.model.train()
    for step in range(5):
        lr = lr_at(train, step, 5, 1, 3)
        lrs.append(lr)
        for p in params:
            p.grad = None
        causal_or_cls_loss(binding.model, next(batches)).backward()
        with torch.no_grad():
            for (m, k), p in named.items():
                p.sub_(lr * (p.grad + c[f"{m}/{k}"] - c_i[f"{m}/{k}"]))
    binding.model.eval()
    by_hand = binding.get_factors()
    binding.set_factors(state.factors)
    total = math.fsum(lrs)
    assert out.upload.step_size == total and (schedule == "constant") == (len(set(lrs)) == 1)
    for m, f in by_hand.items():
        for k in "AB":
            torch.testing.assert_close(out.upload.factors[m].get(k), f.get(k), rtol=2e-5, atol=2e-6)
            x = state.factors[m].get(k)
            ref = c_i[f"{m}/{k}"] - c[f"{m}/{k}"] + (x - out.upload.factors[m].get(k)) / total
            torch.testing.assert_close(record.memory[f"{CLIENT}{m}/{k}"], ref, rtol=1e-6, atol=1e-7)
    # the correction is far above the tolerance: sum_k eta_k |c - c_i| moves every factor
    assert min(float((c[k] - c_i[k]).abs().mean()) for k in c) * total > 100 * 2e-5


def test_without_variates_the_client_trains_as_without_scaffold(binding):
    """Round 0 (every variate zero): the wrapper adds no correction and uploads what the plain
    method uploads, bit for bit; only the memory gains the client's first variate."""
    state = GlobalState(round=0, factors=binding.get_factors(), spec=binding.spec)
    data = completion_data()
    train = TrainConfig(lr=1e-2, max_steps=3, precision="float32")
    outs = []
    for method in (build_method("fedit"), Scaffold(build_method("fedit"), 3)):
        record = ClientRecord()
        outs.append((client_round(binding, method, state, record, data, train, rank=4, num_rounds=2), record))
        binding.set_factors(state.factors)
    (a, ra), (b, rb) = outs
    for m, f in a.upload.factors.items():
        assert torch.equal(f.A, b.upload.factors[m].A) and torch.equal(f.B, b.upload.factors[m].B)
    assert ra.memory == {} and sorted(rb.memory) == sorted(f"{CLIENT}{m}/{k}" for m in f_keys(a) for k in "AB")


def f_keys(out):
    return list(out.upload.factors)


# ---- runs ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def run_config(tmp_path, model, name, **sets):
    return tiny_run_config(tmp_path, model, name, {"train.scaffold": "true", **sets})


def test_a_run_resumes_identically_with_the_variates_checkpointed(tmp_path, tiny):
    """FedIT + SCAFFOLD + FedAdam, 3 rounds at once vs 2 rounds then ``--resume`` to 3: the same
    records and final state; the checkpoint holds c (the method state) and each trained client's
    c_i (its record); the variates are non-zero and the metrics report their norms."""
    from fedlora.engine.checkpoint import load_checkpoint
    from fedlora.engine.local import run_experiment

    sets = {"server.optimizer": "fedadam", "server.lr": "0.01"}
    run_experiment(run_config(tmp_path, tiny, "whole", **sets), progress=False)
    run_experiment(run_config(tmp_path, tiny, "split", **sets, **{"rounds.num_rounds": "2"}), progress=False)
    run_experiment(run_config(tmp_path, tiny, "split", **sets), resume=True, progress=False)
    whole, split = run_records(tmp_path / "whole"), run_records(tmp_path / "split")
    split[1].pop("eval")  # the 2-round run evaluated its last round
    assert whole == split and len(whole) == 3
    assert all(r["report"]["control_norm"] > 0 for r in whole)
    a, b = load_checkpoint(tmp_path / "whole" / "checkpoint"), load_checkpoint(tmp_path / "split" / "checkpoint")
    c = controls(a["method_state"], SERVER)
    assert sorted(c) == sorted(f"{m}/{k}" for m in a["factors"] for k in "AB")
    assert all(torch.equal(c[k], controls(b["method_state"], SERVER)[k]) for k in c)
    trained = {cid for r in whole for cid in r["clients"]}
    assert set(a["clients"]) == trained
    for cid in trained:
        own = controls(a["clients"][cid]["memory"], CLIENT)
        theirs = controls(b["clients"][cid]["memory"], CLIENT)
        assert sorted(own) == sorted(c) and all(torch.equal(v, theirs[k]) for k, v in own.items())
    n = 4  # c = (1/N) sum_i c_i over all clients (the untrained ones hold zero)
    for k, v in c.items():
        total = sum(controls(a["clients"][cid]["memory"], CLIENT)[k] for cid in trained)
        torch.testing.assert_close(v, total / n, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
@pytest.mark.parametrize(("quantization", "dtype"), [("none", "bfloat16"), ("nf4", "float32"), ("nf4", "bfloat16")])
def test_scaffold_runs_on_the_bases_users_run(tmp_path, tiny, quantization, dtype):
    """bf16 and nf4 bases: FFA-LoRA and RoLoRA with SCAFFOLD train, the variates stay finite and
    cover exactly the factors each method averages."""
    from fedlora.engine.local import local_run

    for name in ("ffa_lora", "rolora"):
        cfg = run_config(
            tmp_path, tiny, f"{name}-{quantization}-{dtype}", **{
                "method.name": name, "model.quantization": quantization, "model.dtype": dtype, "rounds.num_rounds": "2"
            }
        )
        engine = local_run(cfg, progress=False)
        engine.run()
        records = run_records(tmp_path / cfg.name)
        assert all(math.isfinite(s["loss"]) for r in records for s in r["train"].values())
        c = controls(engine.state.method_state, SERVER)
        kinds = {k.rpartition("/")[2] for k in c}
        assert kinds == ({"B"} if name == "ffa_lora" else {"A", "B"})  # rolora: A in round 1, B in round 2
        assert all(torch.isfinite(v).all() and v.dtype == torch.float32 for v in c.values())
        assert any(float(v.abs().max()) > 0 for v in c.values())


def test_bad_upload_step_size_is_rejected_by_name():
    from fedlora.methods.validation import InvalidUpdate, check_upload

    state = make_state(SHAPES, 2, seed=0, dtype=torch.float32)
    factors = {m: ModuleFactors(A=f.A.clone(), B=f.B.clone()) for m, f in state.factors.items()}
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(InvalidUpdate, match="step_size"):
            check_upload(ClientUpload("7", factors, 3, bad), state, build_method("fedit"))


def test_f64_reference_helpers_are_not_vacuous():
    """The invariant test's reference would catch a wrong 1/N: one client, N = 2."""
    state = make_state(SHAPES, 2, seed=9)
    g = gen(9)
    method = Scaffold(build_method("fedit"), 2)
    _, upload, memory = client(method, state, "0", {}, 0.5, g)
    c = controls(method.aggregate(state, [upload]).state.method_state, SERVER)
    for k, v in c.items():
        assert_close(v, controls(memory, CLIENT)[k] / 2, 1e-13, k)
        assert float(v.abs().max()) > 0 and v.dtype == F64
