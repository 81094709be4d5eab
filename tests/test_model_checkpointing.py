"""train.gradient_checkpointing: the same losses, LoRA gradients and base-weight gradient estimates
as without it (float32 and a bf16 side-path base), through the binding and a whole run."""

from __future__ import annotations

import json

import pytest
import torch

from fedlora.configs import preset_path
from fedlora.engine.config import load_config
from fedlora.engine.local import run_experiment
from fedlora.lowrank import FactoredDelta
from fedlora.model.backbone import dense_weight
from fedlora.model.binding import LoRABinding, LoRASettings
from fedlora.model.loading import load_model
from helpers import tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def binding(folder, dtype: torch.dtype, checkpointing: bool) -> LoRABinding:
    model = load_model(str(folder), dtype=dtype)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(3)
    b = LoRABinding(model, LoRASettings(rank=4, targets=("q_proj", "v_proj")), "CAUSAL_LM")
    factors = b.get_factors()
    for f in factors.values():
        f.B.normal_()  # B = 0 would give A no gradient
    b.set_factors(factors)
    b.model.train()  # checkpointing acts in training mode only
    return b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpointing_changes_no_gradient(tiny, dtype):
    plain, ckpt = binding(tiny, dtype, False), binding(tiny, dtype, True)
    assert ckpt.model.get_base_model().is_gradient_checkpointing
    name = next(iter(plain.layers))
    w = dense_weight(plain.model, name)
    delta = {name: FactoredDelta.from_factors(torch.randn(w.shape[0], 2) * 1e-2, torch.randn(2, w.shape[1]))}
    for b in (plain, ckpt):
        b.apply_delta(delta)  # bf16: onto the side path, whose hook must run again in the recompute
    x = torch.randint(0, 300, (2, 12))
    batch = {"input_ids": x, "labels": x}
    grads = []
    for b in (plain, ckpt):
        params = b.set_trainable()
        loss = b.model(**batch).loss
        loss.backward()
        grads.append((float(loss), [p.grad.clone() for p in params]))
        for p in params:
            p.grad = None
    (l0, g0), (l1, g1) = grads
    assert l0 == pytest.approx(l1, rel=1e-6)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)

    def loss_fn(model, batch):
        return model(**batch).loss

    e0, e1 = plain.full_weight_gradients([batch], loss_fn), ckpt.full_weight_gradients([batch], loss_fn)
    for m in e0:  # FedSmoothLoRA's estimate: no double count from the recomputed forward
        torch.testing.assert_close(e1[m], e0[m], atol=1e-6, rtol=1e-3)


def test_a_run_with_checkpointing_matches_one_without(tmp_path, tiny):
    def run(name: str, on: bool) -> list[dict]:
        sets = {
            "output_dir": str(tmp_path),
            "name": name,
            "model.name": str(tiny),
            "method.name": "fedsmooth_lora",
            "task.settings": "{n_train: 16, n_test: 2, max_new_tokens: 4, max_length: 64}",
            "rounds.num_rounds": "2",
            "rounds.eval_baseline": "false",
            "train.max_steps": "2",
            "train.grad_batches": "1",
            "train.gradient_checkpointing": str(on).lower(),
        }
        run_experiment(load_config(preset_path("ci"), sets), progress=False)
        return [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    a, b = run("plain", False), run("ckpt", True)
    for ra, rb in zip(a, b, strict=True):
        for cid in ra["train"]:
            assert ra["train"][cid]["loss"] == pytest.approx(rb["train"][cid]["loss"], rel=1e-5)
