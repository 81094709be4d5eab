"""Padding-free batches (fedlora.model.packing): the packed format, the model probe, the same loss
and gradient per token as right-padded rows, and the engine's train.packing choice."""

from __future__ import annotations

import json

import pytest
import torch

from fedlora.configs import preset_path
from fedlora.engine.client import causal_or_cls_loss
from fedlora.engine.config import ConfigError, load_config
from fedlora.engine.local import local_run
from fedlora.engine.setup import packed_batches
from fedlora.model.binding import LoRABinding, LoRASettings
from fedlora.model.packing import (
    accepts_packed_sequences,
    flatten_padded,
    is_right_padded,
    model_inputs,
    sequences_in,
)
from fedlora.tasks.common import completion_batch
from helpers import tiny_llama, tiny_lm


def batch_of(lengths, prompt=2, vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for n in lengths:
        ids = torch.randint(1, vocab, (n,), generator=g).tolist()
        seqs.append((ids[:prompt], ids[prompt:]))
    return completion_batch(seqs, pad=0)


def test_flatten_keeps_the_real_tokens_with_restarting_positions_and_masks_each_first_label():
    batch = batch_of([4, 6, 3])
    packed = flatten_padded(batch)
    assert set(packed) == {"input_ids", "labels", "position_ids"}
    assert packed["input_ids"].shape == (1, 13)
    real = [batch["input_ids"][i, :n] for i, n in enumerate([4, 6, 3])]
    assert torch.equal(packed["input_ids"][0], torch.cat(real))
    assert packed["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 1, 2]
    labels = packed["labels"][0].tolist()
    assert [labels[i] for i in (0, 4, 10)] == [-100, -100, -100]
    # completion labels are the padded batch's, in order
    kept = torch.cat([batch["labels"][i, :n] for i, n in enumerate([4, 6, 3])]).tolist()
    assert labels == kept
    assert sequences_in(packed) == 3 and sequences_in(batch) == 3
    assert model_inputs(packed)["use_cache"] is False and "use_cache" not in model_inputs(batch)


def test_only_right_padded_causal_batches_are_packed():
    batch = batch_of([3, 5])
    assert is_right_padded(batch)
    left = {k: v.flip(1) for k, v in batch.items()}  # left padding
    assert not is_right_padded(left)
    assert not is_right_padded({**batch, "token_type_ids": batch["input_ids"]})
    assert not is_right_padded(
        {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": torch.tensor([0, 1])}
    )  # classification labels
    with pytest.raises(ValueError, match="right-padded"):
        flatten_padded(left)


@pytest.fixture(scope="module")
def lm():
    model, _tok = tiny_lm()
    return model


def lora_model(model, seed=0):
    torch.manual_seed(seed)
    binding = LoRABinding(
        model, LoRASettings(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj")), task_type="CAUSAL_LM"
    )
    for layer in binding.layers.values():  # non-zero B: every factor gets a gradient
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    return binding


@pytest.mark.parametrize("lengths", [[5, 9, 2, 7], [12], [3, 3, 3]])
def test_packed_rows_give_the_padded_loss_and_gradients_per_token(lengths):
    model, _ = tiny_lm()
    binding = lora_model(model)
    batch = batch_of(lengths, prompt=2)
    params = binding.set_trainable()

    def loss_and_grads(b):
        for p in params:
            p.grad = None
        loss = causal_or_cls_loss(binding.model, b)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    binding.model.train()
    loss_pad, grads_pad = loss_and_grads(batch)
    loss_packed, grads_packed = loss_and_grads(flatten_padded(batch))
    assert torch.allclose(loss_packed, loss_pad, rtol=1e-5, atol=1e-6), (loss_packed, loss_pad)
    for gp, gq in zip(grads_pad, grads_packed):
        assert torch.allclose(gq, gp, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    ("dtype", "quantization", "rtol"),
    [(torch.bfloat16, "none", 2e-2), (torch.float32, "nf4", 1e-4), (torch.bfloat16, "nf4", 2e-2)],
)
def test_on_bf16_and_nf4_bases_the_probe_allows_packing_and_the_loss_per_token_holds(
    tmp_path, dtype, quantization, rtol
):
    """The bases users run: a bf16 base, and a bitsandbytes nf4 base computing in float32 or bf16
    (k-bit preparation keeps norms in float32, so the compute dtype comes from the config). The
    probe accepts packing, and the packed loss and LoRA gradients equal the padded ones to the
    compute dtype's rounding."""
    if quantization != "none":
        pytest.importorskip("bitsandbytes")
    from fedlora.model.loading import load_model
    from fedlora.model.packing import _compute_dtype

    model = load_model(str(tiny_llama(tmp_path / "m")), dtype=dtype, quantization=quantization)
    assert _compute_dtype(model) == dtype
    binding = lora_model(model)
    assert binding.accepts_packed_sequences
    batch = batch_of([5, 9, 2, 7], prompt=2)
    params = binding.set_trainable()
    binding.model.train()
    out = []
    for b in (batch, flatten_padded(batch)):
        for p in params:
            p.grad = None
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = causal_or_cls_loss(binding.model, b)
        loss.backward()
        out.append((loss.detach().float(), [p.grad.float().clone() for p in params]))
    (loss_pad, grads_pad), (loss_packed, grads_packed) = out
    assert torch.allclose(loss_packed, loss_pad, rtol=rtol), (loss_packed, loss_pad)
    for gp, gq in zip(grads_pad, grads_packed):
        assert float((gq - gp).norm()) <= 10 * rtol * float(gp.norm()) + 1e-12


def test_without_position_boundaries_the_packed_loss_differs():
    """The check above can fail: packing with one running position (no sequence boundaries)
    lets tokens attend across sequences, and the loss moves."""
    model, _ = tiny_lm()
    binding = lora_model(model)
    batch = batch_of([5, 9, 7], prompt=2)
    packed = flatten_padded(batch)
    running = {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1])[None]}
    with torch.no_grad():
        a = causal_or_cls_loss(binding.model, batch)
        b = causal_or_cls_loss(binding.model, running)
    assert not torch.allclose(a, b, rtol=1e-3)


class IgnoresPositions(torch.nn.Module):
    """A causal LM that drops ``position_ids``: packed sequences see each other."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, input_ids, position_ids=None, **kwargs):
        return self.inner(input_ids=input_ids, **kwargs)


def test_the_probe_accepts_a_llama_and_refuses_a_model_that_ignores_positions(lm):
    assert accepts_packed_sequences(lm)
    assert not accepts_packed_sequences(IgnoresPositions(lm))
    lm.train()
    accepts_packed_sequences(lm)
    assert lm.training  # the flag comes back


def test_packing_choice_follows_the_config_and_refuses_flatten_by_key(tmp_path):
    folder = tiny_llama(tmp_path / "m")
    cfg = load_config(preset_path("ci"), {"model.name": str(folder)})
    binding = lora_model(tiny_lm()[0])
    assert packed_batches(cfg, binding) is True  # auto, and the model can
    cfg.train.packing = "pad"
    assert packed_batches(cfg, binding) is False
    binding.accepts_packed_sequences = False  # a model that cannot (cached property overridden)
    cfg.train.packing = "auto"
    assert packed_batches(cfg, binding) is False
    cfg.train.packing = "flatten"
    with pytest.raises(ValueError, match=r"train\.packing='flatten'"):
        packed_batches(cfg, binding)
    with pytest.raises(ConfigError, match=r"train\.packing=flatten"):
        load_config(preset_path("ci"), {"train.packing": "flatten", "model.kind": "seq_cls"})


def test_a_packed_run_trains_the_same_examples_to_the_same_losses_as_a_padded_run(tmp_path):
    folder = tiny_llama(tmp_path / "m")
    runs = {}
    for mode in ("pad", "flatten"):
        cfg = load_config(
            preset_path("ci"),
            {
                "output_dir": str(tmp_path),
                "name": mode,
                "model.name": str(folder),
                "task.settings": "{n_train: 24, n_test: 2, max_new_tokens: 4, max_length: 64}",
                "partition.num_clients": "2",
                "rounds.num_rounds": "2",
                "rounds.clients_per_round": "2",
                "rounds.eval_baseline": "false",
                "train.max_steps": "3",
                "train.packing": mode,
            },
        )
        local_run(cfg, progress=False).run()
        runs[mode] = [json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(runs["pad"], runs["flatten"], strict=True):
        assert a["clients"] == b["clients"]
        for cid in a["train"]:
            ta, tb = a["train"][cid], b["train"][cid]
            assert ta["examples"] == tb["examples"] and ta["steps"] == tb["steps"]
            assert tb["loss"] == pytest.approx(ta["loss"], rel=1e-4)
