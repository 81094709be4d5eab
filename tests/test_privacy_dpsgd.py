"""Sample-level DP-SGD (issue #19): per-example gradients of the trainable LoRA parameters (and a
``modules_to_save`` head) against each example's own backward, clipping, the seeded Gaussian noise,
quantized bases and bf16 autocast, and the model left exactly as it was (hooks removed)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from fedlora.methods.base import ModuleFactors
from fedlora.model.binding import LoRABinding, LoRASettings
from fedlora.model.packing import flatten_padded
from fedlora.privacy.clipping import gaussian_tensor
from fedlora.privacy.dpsgd import (
    PerExampleGradients,
    dp_gradient,
    iter_micro_batches,
    per_example_gradients,
    per_example_loss,
)
from helpers import tiny_llama, tiny_lm

pytest.importorskip("opacus")
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
F64 = torch.float64
TEXTS = [
    "Question: Tom has 3 apples and buys 4 more.",
    "Answer: 7",
    "0123456789 +-*/=() abc",
    "How many apples does he have? The answer is 7.",
]
PROMPT = [3, 1, 0, 5]  # leading tokens of each example masked out of the loss (-100)


def randomise(binding: LoRABinding, seed: int, scale: float = 0.2) -> None:
    """Non-zero A and B (PEFT's default init has B = 0, which would make every A gradient 0)."""
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for name, (d_out, d_in) in binding.shapes().items():
        r = binding.rank()
        factors[name] = ModuleFactors(
            A=torch.randn(r, d_in, generator=g) * scale, B=torch.randn(d_out, r, generator=g) * scale
        )
    binding.set_factors(factors)


def lm_binding(model=None, *, targets=("q_proj", "v_proj", "down_proj"), seed=0) -> tuple[LoRABinding, list, object]:
    tok = None
    if model is None:
        model, tok = tiny_lm()
    binding = LoRABinding(model, LoRASettings(rank=4, alpha=8.0, targets=targets), "CAUSAL_LM")
    randomise(binding, seed)
    params = binding.set_trainable()
    binding.model.train()
    return binding, params, tok


def lm_batch(tok, texts=TEXTS, prompt=PROMPT) -> dict[str, torch.Tensor]:
    """Right-padded, different lengths, prompt tokens and padding masked in the labels."""
    enc = tok(list(texts), return_tensors="pt", padding=True)
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    for i, k in enumerate(prompt):
        labels[i, :k] = -100
    assert len(set(enc["attention_mask"].sum(1).tolist())) > 1  # padding present
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def single_grads(model, params, batch, autocast=None) -> list[list[torch.Tensor]]:
    """Per example: the gradient of the model's own ``.loss`` on that example alone (unpadded), by a
    plain backward."""
    out = []
    mask = batch.get("attention_mask")
    for i in range(batch["labels"].shape[0]):
        n = int(mask[i].sum()) if mask is not None else None
        one = {k: v[i : i + 1, :n] if v.dim() == 2 else v[i : i + 1] for k, v in batch.items()}
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = model(**one).loss
        out.append([g.detach().float() for g in torch.autograd.grad(loss, params)])
    return out


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.to(F64) - ref.to(F64)).norm() / ref.to(F64).norm().clamp(min=1e-30))


def assert_per_example_match(grads, refs, rtol):
    for i, ref in enumerate(refs):
        flat = torch.cat([g[i].flatten() for g in grads])
        flat_ref = torch.cat([r.flatten() for r in ref])
        assert float(flat_ref.norm()) > 0
        assert rel(flat, flat_ref) <= rtol, f"example {i}: relative error {rel(flat, flat_ref):.2e}"


def hook_state(model) -> list[tuple]:
    return [
        (
            name,
            dict(m._forward_hooks),
            dict(m._forward_pre_hooks),
            dict(m._backward_hooks),
            dict(m._backward_pre_hooks),
            m.__dict__.get("_is_full_backward_hook"),
        )
        for name, m in model.named_modules()
    ]


# ---- per-example gradients -------------------------------------------------------------------------
def test_per_example_gradients_equal_each_examples_own_backward():
    binding, params, tok = lm_binding()
    batch = lm_batch(tok)
    grads, losses = per_example_gradients(binding.model, params, batch)
    assert [tuple(g.shape) for g in grads] == [(4, *p.shape) for p in params]
    assert all(g.dtype == torch.float32 for g in grads)
    refs = single_grads(binding.model, params, batch)
    assert_per_example_match(grads, refs, 1e-5)
    # the losses are each example's own .loss (mean over its unmasked label tokens)
    for i in range(4):
        n = int(batch["attention_mask"][i].sum())
        own = binding.model(input_ids=batch["input_ids"][i : i + 1, :n], labels=batch["labels"][i : i + 1, :n]).loss
        assert float(losses[i]) == pytest.approx(float(own.detach()), rel=1e-5)
    # B and A both reached (A would be all zero with B = 0)
    assert all(float(g.abs().max()) > 0 for g in grads)


def test_an_example_without_label_tokens_has_zero_loss_and_gradient():
    binding, params, tok = lm_binding()
    batch = lm_batch(tok, prompt=[3, 100, 0, 5])  # example 1 fully masked
    grads, losses = per_example_gradients(binding.model, params, batch)
    assert float(losses[1]) == 0.0 and all(float(g[1].abs().max()) == 0.0 for g in grads)
    assert all(float(g[0].abs().max()) > 0 for g in grads)


# ---- the privatised gradient -----------------------------------------------------------------------
def test_without_clipping_or_noise_it_is_the_mean_of_the_examples_gradients_also_over_micro_batches():
    binding, params, tok = lm_binding()
    batch = lm_batch(tok)
    refs = single_grads(binding.model, params, batch)
    mean = [sum(r[j] for r in refs) / len(refs) for j in range(len(params))]
    gen = torch.Generator().manual_seed(0)
    for batches in (batch, list(iter_micro_batches(batch, 3)), list(iter_micro_batches(batch, 1))):
        for p in params:
            p.grad = torch.full_like(p, 7.0)  # replaced, not added to
        step = dp_gradient(binding.model, params, batches, clip=1e9, noise_multiplier=0.0, generator=gen)
        assert step.examples == 4 and step.batch_size == 4 and step.clipped == 0
        for p, m in zip(params, mean):
            assert p.grad.dtype == p.dtype
            assert rel(p.grad, m) <= 1e-5
    # the expected batch size is the denominator
    dp_gradient(binding.model, params, batch, clip=1e9, noise_multiplier=0.0, generator=gen, expected_batch_size=10)
    for p, m in zip(params, mean):
        assert rel(p.grad, m * 4 / 10) <= 1e-5


def test_a_small_clip_clips_every_example_and_bounds_the_norm():
    binding, params, tok = lm_binding()
    batch = lm_batch(tok)
    refs = single_grads(binding.model, params, batch)
    norms = torch.stack([torch.cat([r.flatten() for r in ref]).norm() for ref in refs])
    clip = float(norms.min()) / 5
    step = dp_gradient(
        binding.model,
        params,
        list(iter_micro_batches(batch, 2)),
        clip=clip,
        noise_multiplier=0.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.allclose(step.norms, norms, rtol=1e-5)
    assert step.clipped == 4 and bool((step.norms > clip).all())
    total = torch.cat([p.grad.flatten() for p in params]).norm()
    assert float(total) <= clip
    expected = [
        sum(r[j] * (clip / (float(norms[i]) + 1e-6)) for i, r in enumerate(refs)) / 4 for j in range(len(params))
    ]
    for p, e in zip(params, expected):
        assert rel(p.grad, e) <= 1e-5
    # a clip between the norms clips only the larger ones
    mid = float(norms.median())
    step = dp_gradient(binding.model, params, batch, clip=mid, noise_multiplier=0.0, generator=torch.Generator())
    assert step.clipped == int((norms + 1e-6 > mid).sum()) and 0 < step.clipped < 4


def test_noise_is_seeded_and_its_std_is_sigma_c_over_b():
    binding, params, tok = lm_binding()
    batch = lm_batch(tok)
    clip, sigma, B = 0.05, 1.3, 4

    def run(seed, noise=sigma):
        dp_gradient(
            binding.model,
            params,
            batch,
            clip=clip,
            noise_multiplier=noise,
            generator=torch.Generator().manual_seed(seed),
        )
        return [p.grad.clone() for p in params]

    clean, a, b, c = run(0, 0.0), run(11), run(11), run(12)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not any(torch.equal(x, y) for x, y in zip(a, c))
    z = torch.cat([((x - y) * B / clip).flatten() for x, y in zip(a, clean)]).to(F64)
    n = z.numel()
    assert n > 3000
    assert abs(float(z.std()) - sigma) <= 4 * sigma / math.sqrt(2 * n)
    assert abs(float(z.mean())) <= 4 * sigma / math.sqrt(n)
    # noise once per optimizer step: two micro-batches give the one-batch gradient, same draws
    micro = list(iter_micro_batches(batch, 2))
    dp_gradient(
        binding.model, params, micro, clip=clip, noise_multiplier=sigma, generator=torch.Generator().manual_seed(11)
    )
    assert all(rel(p.grad, x) <= 1e-5 for p, x in zip(params, a))
    # exactly the generator's float64 draws, parameter by parameter in order
    g = torch.Generator().manual_seed(11)
    for x, y, p in zip(a, clean, params):
        draw = gaussian_tensor(p.shape, sigma * clip, g)
        assert torch.allclose((x - y).to(F64), draw / B, atol=1e-6)


# ---- quantized bases and autocast ------------------------------------------------------------------
def _assert_dp_runs(binding, params, batch, autocast):
    step = dp_gradient(
        binding.model,
        params,
        batch,
        clip=1e9,
        noise_multiplier=0.0,
        autocast=autocast,
        generator=torch.Generator().manual_seed(0),
    )
    assert all(torch.isfinite(p.grad).all() and p.grad.dtype == p.dtype for p in params)
    assert torch.isfinite(step.norms).all() and step.examples == batch["labels"].shape[0]


def test_bf16_autocast_per_example_gradients_match_within_bf16_tolerance():
    binding, params, tok = lm_binding()
    batch = lm_batch(tok)
    grads, _ = per_example_gradients(binding.model, params, batch, autocast=torch.bfloat16)
    assert all(g.dtype == torch.float32 for g in grads)
    assert_per_example_match(grads, single_grads(binding.model, params, batch, autocast=torch.bfloat16), 1e-2)
    _assert_dp_runs(binding, params, batch, torch.bfloat16)
    with pytest.raises(ValueError, match="float16 autocast"):
        per_example_gradients(binding.model, params, batch, autocast=torch.float16)


@needs_bnb
@pytest.mark.parametrize(
    "quantization,autocast,rtol",
    [("nf4", None, 1e-5), ("nf4", torch.bfloat16, 1e-2), ("int8", None, 1e-4)],
)
def test_quantized_bases(tmp_path, quantization, autocast, rtol):
    from fedlora.model.loading import load_model

    folder = tiny_llama(tmp_path / "m")
    _, tok = tiny_lm()
    model = load_model(str(folder), quantization=quantization)
    binding, params, _ = lm_binding(model)
    frozen = [m for n, m in binding.model.named_modules() if type(m).__module__.startswith("bitsandbytes")]
    assert frozen  # the base really is quantized
    batch = lm_batch(tok)
    with PerExampleGradients(binding.model, params) as hooks:
        assert not any(m._forward_hooks for m in frozen)  # frozen quantized layers are skipped
        grads, _ = hooks.compute(batch, autocast=autocast)
    assert_per_example_match(grads, single_grads(binding.model, params, batch, autocast=autocast), rtol)
    _assert_dp_runs(binding, params, batch, autocast)


# ---- the model is left as it was -------------------------------------------------------------------
def test_the_model_is_unwrapped_after_each_call_and_the_binding_serves_the_next_client():
    binding, params, tok = lm_binding()
    model = binding.model
    batch = lm_batch(tok)
    before = hook_state(model)

    def plain():
        for p in params:
            p.grad = None
        model(**batch).loss.backward()
        return [p.grad.clone() for p in params]

    ref = plain()
    with PerExampleGradients(model, params) as hooks:
        lora_a = next(iter(binding.layers.values())).lora_A["default"]
        assert lora_a._forward_hooks and lora_a._backward_hooks  # attached in place, no copy
        # a plain step while attached records nothing and does not disturb the next DP step
        assert all(torch.equal(a, b) for a, b in zip(plain(), ref))
        assert "activations" not in lora_a.__dict__ and all(p.grad_sample is None for p in params)
        grads, _ = hooks.compute(batch)
        assert_per_example_match(grads, single_grads(model, params, batch), 1e-5)
    assert hook_state(model) == before
    dp_gradient(model, params, batch, clip=0.1, noise_multiplier=1.0, generator=torch.Generator().manual_seed(0))
    assert hook_state(model) == before
    assert not hasattr(model, "autograd_grad_sample_hooks")
    for m in model.modules():
        assert not {"activations", "max_batch_len"} & set(m.__dict__)
    for p in model.parameters():
        assert not {"grad_sample", "_forward_counter", "_current_grad_sample"} & set(p.__dict__)
    assert all(torch.equal(a, b) for a, b in zip(plain(), ref))
    # an old-style backward hook can still be registered (torch's full-hook mark was put back)
    lora_a.register_backward_hook(lambda *a: None).remove()
    before = hook_state(model)  # torch now marks lora_a old-style for good: attaching still works, the mark stays
    # a failure inside the step still removes everything
    with pytest.raises(ValueError, match="one example per row"):
        dp_gradient(model, params, flatten_padded(batch), clip=1.0, noise_multiplier=0.0, generator=torch.Generator())
    assert hook_state(model) == before
    # the next client: other factors, attach again (Opacus refuses to attach twice if anything is left)
    randomise(binding, seed=5)
    grads, _ = per_example_gradients(model, params, batch)
    assert_per_example_match(grads, single_grads(model, params, batch), 1e-5)
    assert hook_state(model) == before


def test_misuse_is_refused():
    binding, params, tok = lm_binding()
    batch = lm_batch(tok)
    with pytest.raises(ValueError, match="exactly the model's trainable parameters"):
        PerExampleGradients(binding.model, params[:-1])
    binding.model.eval()
    with pytest.raises(ValueError, match="training mode"):
        per_example_gradients(binding.model, params, batch)
    binding.model.train()
    with pytest.raises(ValueError, match="clip"):
        dp_gradient(binding.model, params, batch, clip=0.0, noise_multiplier=1.0, generator=torch.Generator())


def test_inputs_that_require_a_gradient_and_an_existing_grad_are_handled():
    """``enable_input_require_grads`` (k-bit preparation, checkpointing) made the first layers' full
    backward hooks silent under ``autograd.grad(loss, params)``; a full backward is used instead,
    with ``p.grad`` stashed and put back."""
    binding, params, tok = lm_binding()
    binding.model.get_base_model().enable_input_require_grads()
    batch = lm_batch(tok)
    for p in params:
        p.grad = torch.full_like(p, 3.0)
    grads, _ = per_example_gradients(binding.model, params, batch)
    assert all(bool((p.grad == 3.0).all()) for p in params)
    assert_per_example_match(grads, single_grads(binding.model, params, batch), 1e-5)


def test_gradient_checkpointing_is_refused_and_wrong_hooks_are_caught(monkeypatch):
    """Checkpointing made Opacus's hooks silently wrong (relative error ~1 in an experiment, both
    reentrant and not): refused. Any hook that is off is caught by the sum check."""
    from fedlora.privacy import dpsgd

    binding, params, tok = lm_binding()
    batch = lm_batch(tok)
    binding.model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    binding.model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        per_example_gradients(binding.model, params, batch)
    binding.model.get_base_model().gradient_checkpointing_disable()
    real = dpsgd._linear_grad_sample_fp32
    monkeypatch.setattr(dpsgd, "_linear_grad_sample_fp32", lambda *a: {k: 1.2 * v for k, v in real(*a).items()})
    with PerExampleGradients(binding.model, params) as hooks:
        with pytest.raises(RuntimeError, match="do not sum to the batch gradient"):
            hooks.compute(batch)
        monkeypatch.setattr(dpsgd, "_linear_grad_sample_fp32", real)
    # a failed step leaves nothing behind: the next one (fresh hooks) is right
    grads, _ = per_example_gradients(binding.model, params, batch)
    assert_per_example_match(grads, single_grads(binding.model, params, batch), 1e-5)


# ---- a classifier with a trainable head ------------------------------------------------------------
def test_a_classifier_with_a_trainable_head_via_modules_to_save():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertForSequenceClassification(config)
    lora = LoRASettings(rank=2, alpha=4.0, targets=("query", "value"), modules_to_save=("classifier",))
    binding = LoRABinding(model, lora, "SEQ_CLS")
    randomise(binding, 3)
    params = binding.set_trainable()
    head = [p for n, p in binding.model.named_parameters() if "modules_to_save" in n and p.requires_grad]
    assert len(head) == 2  # classifier weight and bias
    binding.model.train()
    lengths = [7, 3, 5, 9]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (4, 9), generator=g)
    mask = (torch.arange(9)[None] < torch.tensor(lengths)[:, None]).long()
    batch = {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.tensor([0, 2, 1, 2])}
    grads, losses = per_example_gradients(binding.model, params, batch)
    refs = single_grads(binding.model, params, batch)
    assert_per_example_match(grads, refs, 1e-5)
    for p, gs in zip(params, grads):
        if any(p is h for h in head):
            assert float(gs.abs().max()) > 0
    assert torch.allclose(
        losses,
        torch.nn.functional.cross_entropy(
            binding.model(input_ids=batch["input_ids"], attention_mask=mask).logits, batch["labels"], reduction="none"
        ),
        rtol=1e-5,
    )


class _Fixed(torch.nn.Module):
    def __init__(self, logits, problem_type=None):
        super().__init__()
        self.logits = logits
        self.config = type("Config", (), {"problem_type": problem_type})()

    def forward(self, **_):
        return type("Out", (), {"logits": self.logits})()


def test_per_example_classification_losses_follow_transformers_problem_types():
    reg = per_example_loss(_Fixed(torch.tensor([[1.0], [2.0]])), {"labels": torch.tensor([0.5, 4.0])})
    assert torch.allclose(reg, torch.tensor([0.25, 4.0]))
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    single = per_example_loss(_Fixed(logits), {"labels": torch.tensor([0, 2])})
    assert torch.allclose(single, -torch.log_softmax(logits, 1)[[0, 1], [0, 2]])
    multi = per_example_loss(_Fixed(logits), {"labels": torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])})
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    assert torch.allclose(multi[1], bce(logits[1], torch.tensor([0.0, 0.0, 1.0])))
