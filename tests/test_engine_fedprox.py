"""FedProx (``train.prox_mu``): the proximal term's gradient, and what it does to a client's round
(``client_round`` on a tiny random LLaMA, the path every runtime takes)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

import fedlora.engine.client as client_mod
from fedlora.engine.client import ClientRecord, client_round
from fedlora.engine.config import TrainConfig
from fedlora.engine.train import proximal_term
from fedlora.methods import GlobalState, build_method
from helpers import F64, assert_close, completion_data, gen, randn, tiny_lora_binding


def test_gradient_is_mu_times_the_distance_to_the_start():
    g = gen(0)
    params = [torch.nn.Parameter(randn(5, 3, g=g)), torch.nn.Parameter(randn(2, 7, g=g))]
    term = proximal_term(params, 0.37)
    start = [p.detach().clone() for p in params]
    with torch.no_grad():  # move away from the anchor
        for p in params:
            p.add_(randn(*p.shape, g=g))
    value = term()
    value.backward()
    ref = sum(0.5 * 0.37 * float(((p.detach() - s) ** 2).sum()) for p, s in zip(params, start))
    assert value.dtype == F64 and abs(float(value.detach()) - ref) <= 1e-14 * ref
    for p, s in zip(params, start):
        assert_close(p.grad, 0.37 * (p.detach() - s), 1e-15, "mu (theta - theta_start)")





@pytest.fixture(scope="module")
def binding():
    return tiny_lora_binding()


def one_round(binding, method_name, mu):
    method = build_method(method_name)
    state = GlobalState(round=0, factors=binding.get_factors(), spec=binding.spec)
    data = completion_data()
    train = TrainConfig(optimizer="sgd", lr=0.5, max_steps=6, clip=0.0, precision="float32", prox_mu=mu)
    out = client_round(binding, method, state, ClientRecord(), data, train, rank=4, num_rounds=1)
    binding.set_factors(state.factors)  # leave the module's model as found
    return state, out


def distance(state, upload) -> float:
    total = 0.0
    for m, f in upload.factors.items():
        for k in "AB":
            t = f.get(k)
            if t is not None:
                total += float(((t - state.factors[m].get(k)) ** 2).sum())
    return total**0.5


@pytest.mark.parametrize("method_name", ["fedit", "ffa_lora"])
def test_a_proximal_client_stays_closer_to_its_start(binding, method_name):
    state, free = one_round(binding, method_name, 0.0)
    _, prox = one_round(binding, method_name, 1.0)
    d_free, d_prox = distance(state, free.upload), distance(state, prox.upload)
    assert 0 < d_prox < 0.8 * d_free, (d_prox, d_free)
    assert free.stats["steps"] == prox.stats["steps"] == 6


def test_mu_zero_takes_todays_path_bit_for_bit(binding, monkeypatch):
    """``prox_mu = 0`` passes no regulariser at all: the training loop is the one without FedProx."""
    seen = []
    original = client_mod.train_local

    def spy(*args, **kwargs):
        seen.append(kwargs.get("regulariser"))
        return original(*args, **kwargs)

    monkeypatch.setattr(client_mod, "train_local", spy)
    state, a = one_round(binding, "fedit", 0.0)
    _, b = one_round(binding, "fedit", 0.0)
    _, c = one_round(binding, "fedit", 1e-3)
    assert seen[:2] == [None, None] and callable(seen[2])
    for m, f in a.upload.factors.items():
        assert torch.equal(f.A, b.upload.factors[m].A) and torch.equal(f.B, b.upload.factors[m].B)
    assert any(not torch.equal(f.B, c.upload.factors[m].B) for m, f in a.upload.factors.items())
    assert a.stats["loss"] == b.stats["loss"]


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fedprox_server_optimizer_and_the_change_rule_run_on_an_nf4_base(tmp_path, dtype):
    """The bases users run: an nf4 base computing in float32 or bf16. FedIT with FedProx and FedAdam
    trains and steps the server moments; FedMomentum's default rule (over the round's change, on the
    side path) drops at most 1 - tau of each round's change."""
    from fedlora.configs import preset_path
    from fedlora.engine.config import load_config
    from fedlora.engine.local import local_run
    from helpers import tiny_llama

    folder = tiny_llama(tmp_path / "m")
    common = {
        "output_dir": str(tmp_path),
        "model.name": str(folder),
        "model.quantization": "nf4",
        "model.dtype": dtype,
        "task.settings": "{n_train: 24, n_test: 2, max_new_tokens: 4, max_length: 64}",
        "rounds.num_rounds": "2",
        "rounds.eval_baseline": "false",
        "train.max_steps": "3",
    }
    runs = {
        "prox": {"method.name": "fedit", "train.prox_mu": "0.1", "server.optimizer": "fedadam", "server.lr": "0.05"},
        "mom": {"method.name": "fedmomentum", "method.settings": "{tau: 0.99}"},
    }
    for name, sets in runs.items():
        engine = local_run(load_config(preset_path("ci"), {**common, **sets, "name": name}), progress=False)
        engine.run()
        records = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in records if r.get("phase") == "train"]
        assert len(train) == 2 and not any(r["skipped"] for r in train)
        assert all(math.isfinite(s["loss"]) for r in train for s in r["train"].values())
        if name == "prox":
            assert engine.server_opt and all(torch.isfinite(t).all() for t in engine.server_opt.values())
        else:
            assert engine.binding.backbone_mode == "side"
            assert train[1]["report"]["dropped_of_change"] <= 0.01 + 1e-9
