"""Backbone deltas on float32, bf16, 4-bit and 8-bit bases: the side path keeps base + ledger exact
(against float64 references), merging into bf16 loses the delta, quantized weights refuse a merge."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

from fedlora.lowrank import FactoredDelta
from fedlora.model import side as side_path
from fedlora.model.backbone import dense_weight
from fedlora.model.binding import LoRABinding, LoRASettings

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes")
TARGETS = ("q_proj", "v_proj", "down_proj")  # square and non-square weights


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def load(path, base: str):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    if base in ("float32", "bfloat16"):
        return LlamaForCausalLM.from_pretrained(path, dtype=getattr(torch, base))
    quant = {
        "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
        "nf4-f32": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        ),
        "int8": BitsAndBytesConfig(load_in_8bit=True),
    }[base]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LlamaForCausalLM.from_pretrained(path, quantization_config=quant, device_map="cpu")


def bind(path, base: str, mode: str, **lora) -> LoRABinding:
    settings = LoRASettings(rank=4, alpha=8.0, targets=TARGETS, backbone_delta=mode, **lora)
    return LoRABinding(load(path, base), settings, "CAUSAL_LM")


def random_rounds(binding: LoRABinding, rounds: int, rel: float, seed: int = 1):
    """``rounds`` random rank-4 deltas per module of about ``rel * ||W||`` each; the float64 sum."""
    g = torch.Generator().manual_seed(seed)
    w0 = {n: dense_weight(binding.model, n) for n in binding.layers}
    steps, ledger = [], {n: torch.zeros(w.shape, dtype=torch.float64) for n, w in w0.items()}
    for _ in range(rounds):
        step = {}
        for n, w in w0.items():
            d_out, d_in = w.shape
            up = torch.randn(d_out, 4, generator=g) * (rel * float(w.norm()) / (2 * (d_out * d_in) ** 0.5))
            down = torch.randn(4, d_in, generator=g)
            step[n] = FactoredDelta.from_factors(up, down)
            ledger[n] += up.double() @ down.double()
        steps.append(step)
    return w0, steps, ledger


def effective_delta(binding: LoRABinding, name: str, w0: torch.Tensor) -> torch.Tensor:
    """What the layer adds to its original weights: stored-weight change + side path (float64)."""
    side = side_path.side_of(binding.layers[name].get_base_layer())
    out = dense_weight(binding.model, name).double() - w0.double()
    return out + side.dense() if side is not None else out


def max_rel_error(binding, w0, ledger) -> float:
    return max(float((effective_delta(binding, n, w0[n]) - ref).norm() / ref.norm()) for n, ref in ledger.items())


@pytest.mark.parametrize(
    "base", ["float32", "bfloat16", pytest.param("nf4", marks=needs_bnb), pytest.param("int8", marks=needs_bnb)]
)
def test_the_side_path_keeps_base_plus_ledger_exact_on_every_base(tiny_dir, base):
    b = bind(tiny_dir, base, "auto")
    assert b.backbone_mode == ("merge" if base == "float32" else "side")
    b = bind(tiny_dir, base, "side")
    w0, steps, ledger = random_rounds(b, 5, 1e-3)
    for step in steps:
        b.apply_delta(step)
    assert max_rel_error(b, w0, ledger) < 1e-5
    for n in b.layers:  # the stored weights are untouched: the delta lives on the side
        assert torch.equal(dense_weight(b.model, n), w0[n])
    report = b.backbone_report()
    assert report["side_rank_max"] == 20 and report["side_dropped_max"] == 0.0


def test_merging_into_bf16_loses_most_of_a_small_delta(tiny_dir):
    b = bind(tiny_dir, "bfloat16", "merge")
    w0, steps, ledger = random_rounds(b, 5, 1e-4)
    for step in steps:
        b.apply_delta(step)
    assert max_rel_error(b, w0, ledger) > 0.5  # the reason the side path exists
    f = bind(tiny_dir, "float32", "merge")
    w0, steps, ledger = random_rounds(f, 5, 1e-4)
    for step in steps:
        f.apply_delta(step)
    assert max_rel_error(f, w0, ledger) < 1e-3  # float32 weights merge exactly enough


@needs_bnb
@pytest.mark.parametrize("base", ["nf4", "int8"])
def test_a_quantized_weight_refuses_a_merge_by_name_and_changes_nothing(tiny_dir, base):
    b = bind(tiny_dir, base, "merge")
    w0, steps, _ = random_rounds(b, 1, 1e-3)
    with pytest.raises(ValueError, match=r"backbone_delta=merge: .*q_proj has a quantized weight"):
        b.apply_delta(steps[0])
    for n in b.layers:
        assert torch.equal(dense_weight(b.model, n), w0[n])
        assert side_path.side_of(b.layers[n].get_base_layer()) is None


def test_side_forward_equals_the_merged_model_in_float32(tiny_dir):
    merged, side = bind(tiny_dir, "float32", "merge"), bind(tiny_dir, "float32", "side")
    _, steps, _ = random_rounds(merged, 3, 1e-2)
    for step in steps:
        merged.apply_delta(step)
        side.apply_delta(step)
    x = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        a, b = merged.model(input_ids=x).logits, side.model(input_ids=x).logits
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    assert not any("side" in k for k in side.model.state_dict())  # no parameters, not saved


def test_a_rank_cap_reports_the_energy_it_drops(tiny_dir):
    b = bind(tiny_dir, "float32", "side", side_max_rank=6)
    w0, steps, ledger = random_rounds(b, 3, 1e-3)
    one = {n: FactoredDelta(*w0[n].shape) for n in b.layers}  # the three rounds as one rank-12 delta
    for step in steps:
        for n, d in step.items():
            one[n].extend(d)
    b.apply_delta(one)
    for name in b.layers:
        s = torch.linalg.svdvals(ledger[name])
        expected = float(s[6:].square().sum() / s.square().sum())  # float64 reference
        assert b.side_dropped[name] == pytest.approx(expected, rel=1e-3)
        kept = effective_delta(b, name, w0[name])
        assert float((kept - ledger[name]).norm() ** 2 / ledger[name].norm() ** 2) == pytest.approx(expected, rel=1e-3)
    b.apply_delta(steps[0])  # a second drop adds to the running total
    report = b.backbone_report()
    assert report["side_rank_max"] == 6 and report["side_dropped_max"] > max(b.side_dropped.values()) > 0


def test_replaying_a_ledger_rebuilds_the_same_side_path_bit_for_bit(tiny_dir):
    a, b = bind(tiny_dir, "bfloat16", "side"), bind(tiny_dir, "bfloat16", "side")
    _, steps, _ = random_rounds(a, 4, 1e-3)
    for step in steps:
        a.apply_delta(step)
        b.apply_delta(step)
    for n in a.layers:
        sa, sb = (side_path.side_of(x.layers[n].get_base_layer()).delta for x in (a, b))
        assert torch.equal(sa.ups[0], sb.ups[0]) and torch.equal(sa.downs[0], sb.downs[0])


def test_a_client_shift_on_the_side_path_is_undone_exactly(tiny_dir):
    b = bind(tiny_dir, "bfloat16", "side")
    w0, steps, ledger = random_rounds(b, 2, 1e-3)
    b.apply_delta(steps[0])
    name = next(iter(b.layers))
    before = effective_delta(b, name, w0[name])
    report = dict(b.side_dropped)
    shift = {name: steps[1][name]}
    with b.shifted(shift):
        inside = effective_delta(b, name, w0[name])
        torch.testing.assert_close(inside - before, steps[1][name].dense(), atol=1e-9, rtol=1e-5)
    assert torch.equal(effective_delta(b, name, w0[name]), before)
    assert b.side_dropped == report  # the last round's report, not the shift's
    other = list(b.layers)[1]
    fresh = bind(tiny_dir, "bfloat16", "side")
    with fresh.shifted({other: steps[0][other]}):
        assert side_path.side_of(fresh.layers[other].get_base_layer()) is not None
    assert side_path.side_of(fresh.layers[other].get_base_layer()) is None  # attached for the shift only


def test_weight_gradients_from_activations_equal_autograd_on_the_weight(tiny_dir):
    b = bind(tiny_dir, "float32", "merge")
    _, steps, _ = random_rounds(b, 1, 1e-2)
    b.apply_delta(steps[0])
    x = torch.randint(0, 128, (3, 10))
    batches = [{"input_ids": x, "labels": x}, {"input_ids": x[:2, :7], "labels": x[:2, :7]}]

    def loss_fn(model, batch):
        return model(**batch).loss

    reference = b.full_weight_gradients(batches, loss_fn)  # float32 weights: autograd on W
    by_hooks = b._gradients_from_activations(batches, loss_fn)
    assert set(reference) == set(by_hooks)
    for n in reference:
        torch.testing.assert_close(by_hooks[n], reference[n], atol=1e-6, rtol=1e-4)
    assert all(not p.requires_grad for p in b.model.parameters())  # flags restored


@needs_bnb
def test_weight_gradients_on_a_4bit_base_match_its_dequantized_float32_twin(tiny_dir):
    """nf4 weights have no gradient of their own: the estimate comes from activations and equals
    autograd on a float32 model holding the dequantized weights (nf4 with float32 compute)."""
    from bitsandbytes.nn import Linear4bit
    from peft.utils.integrations import dequantize_module_weight

    q = bind(tiny_dir, "nf4-f32", "auto")
    f = bind(tiny_dir, "float32", "merge")
    twins = dict(f.model.named_modules())
    with torch.no_grad():
        for name, module in q.model.named_modules():
            if isinstance(module, Linear4bit):  # every quantized layer, adapted or not
                twins[name].weight.copy_(dequantize_module_weight(module).float())
    x = torch.randint(0, 128, (2, 8))
    batches = [{"input_ids": x, "labels": x}]

    def loss_fn(model, batch):
        return model(**batch).loss

    gq, gf = q.full_weight_gradients(batches, loss_fn), f.full_weight_gradients(batches, loss_fn)
    for n in gf:
        torch.testing.assert_close(gq[n], gf[n], atol=1e-6, rtol=1e-3)
