"""Issue #15's acceptance: after T rounds of each backbone-merging method on a bf16 and on an nf4
base, the function the clients train on is base + ledger (float64 reference) to 1e-3 of the
accumulated delta; merging into bf16 weights fails the same check."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from fedlora.configs import preset_path
from fedlora.engine.config import load_config
from fedlora.engine.local import local_run
from fedlora.model import side as side_path
from fedlora.model.backbone import dense_weight
from fedlora.model.loading import load_model
from helpers import tiny_llama

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
MERGING = {  # every method whose aggregation changes the backbone, with settings that make it do so
    "fedmomentum": "{tau: 1.0}",
    "flora": "{}",
    "fedex_lora": "{}",
    "frlora": "{}",
    "fedsmooth_lora": "{}",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def run(tmp_path, model_dir, method: str, base: str, mode: str):
    sets = {
        "output_dir": str(tmp_path),
        "name": f"{method}-{base}-{mode}",
        "model.name": str(model_dir),
        "model.dtype": "float32" if base == "float32" else "bfloat16",
        "model.quantization": "nf4" if base == "nf4" else "none",
        "model.backbone_delta": mode,
        "lora.targets": "[q_proj, v_proj, down_proj]",
        "method.name": method,
        "method.settings": MERGING[method],
        "task.settings": "{n_train: 24, n_test: 2, max_new_tokens: 4, max_length: 64}",
        "rounds.num_rounds": "2",
        "rounds.eval_baseline": "false",
        "train.max_steps": "2",
        "train.lr": "5e-3",
        "train.grad_batches": "1",
    }
    engine = local_run(load_config(preset_path("ci"), sets), progress=False)
    engine.run()
    return engine


def backbone_error(engine, model_dir, base: str) -> float:
    """max over modules of ||(what the layers add to the fresh base) - ledger|| / ||ledger||."""
    fresh = load_model(
        str(model_dir),
        dtype=torch.float32 if base == "float32" else torch.bfloat16,
        quantization="nf4" if base == "nf4" else "none",
    )
    worst, total = 0.0, 0.0
    for m, layer in engine.binding.layers.items():
        ref = torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64)
        for step in engine.ledger:
            if m in step:
                ref += step[m].dense()
        if float(ref.norm()) == 0.0:
            continue
        plain = m.removeprefix("base_model.model.")
        now = dense_weight(engine.binding.model, m).double() - dense_weight(fresh, plain).double()
        side = side_path.side_of(layer.get_base_layer())
        if side is not None:
            now += side.dense()
        worst = max(worst, float((now - ref).norm() / ref.norm()))
        total += float(ref.norm())
    assert total > 0, "the method merged nothing: the check would be empty"
    return worst


@pytest.mark.parametrize("base", ["bfloat16", pytest.param("nf4", marks=needs_bnb)])
@pytest.mark.parametrize("method", sorted(MERGING))
def test_the_trained_function_is_base_plus_ledger(tmp_path, tiny, method, base):
    engine = run(tmp_path, tiny, method, base, "auto")
    assert engine.binding.backbone_mode == "side"
    assert backbone_error(engine, tiny, base) <= 1e-3
    records = [r for r in (tmp_path / f"{method}-{base}-auto" / "metrics.jsonl").read_text().splitlines()]
    assert '"backbone": {"side_rank_mean"' in records[-1]  # the side path's size is in the record
    momentum = [json.loads(r)["momentum"] for r in records]  # computed from the float32 factors
    assert all(m["update_norm"] > 0 for m in momentum)
    if method in ("fedmomentum", "flora", "fedex_lora"):  # exact: the clients' mean, at rounding
        assert all(m["aggregation_error"] < 1e-5 for m in momentum)


def test_merging_into_bf16_fails_the_same_check(tmp_path, tiny):
    engine = run(tmp_path, tiny, "flora", "bfloat16", "merge")
    assert engine.binding.backbone_mode == "merge"
    assert backbone_error(engine, tiny, "bfloat16") > 1e-2
