"""model.quantization: refused by key before any model loads when the machine cannot run it, and
combinations that cannot be exact (merge into quantized weights, PiSSA on a non-float32 base)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from fedlora.configs import preset_path
from fedlora.engine.config import ConfigError, load_config
from fedlora.model import quantization as Q

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")


@needs_bnb
def test_every_quantization_runs_on_this_cpu():
    assert Q.runnable(torch.device("cpu")) == {"none": None, "nf4": None, "fp4": None, "int8": None}
    for q in Q.QUANTIZATIONS:
        Q.check_quantization(q, torch.device("cpu"), torch.float32)


@needs_bnb
def test_a_quantization_without_its_kernel_is_refused_naming_the_key_and_what_runs(monkeypatch):
    real = Q._probe

    def no_int8(quantization, device, dtype):
        if quantization == "int8":
            raise RuntimeError("no int8 kernel for this device")
        return real(quantization, device, dtype)

    monkeypatch.setattr(Q, "_probe", no_int8)
    with pytest.raises(
        ValueError, match=r"model\.quantization=int8 cannot run on cpu .*no int8 kernel.*available here: none, nf4, fp4"
    ):
        Q.check_quantization("int8", torch.device("cpu"), torch.float32)


def test_without_bitsandbytes_a_quantization_is_refused_before_loading(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(ValueError, match=r"model\.quantization=nf4 needs bitsandbytes.*available here: none"):
        Q.check_quantization("nf4", torch.device("cpu"), torch.float32)
    Q.check_quantization("none", torch.device("cpu"), torch.float32)  # nothing to check


def test_the_build_refuses_before_the_model_loads(tmp_path, monkeypatch):
    from fedlora.engine import setup

    def no_model(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr("fedlora.model.loading.load_model", no_model)
    monkeypatch.setattr(Q, "_probe", lambda *a: (_ for _ in ()).throw(RuntimeError("kernel missing")))
    cfg = load_config(preset_path("ci"), {"output_dir": str(tmp_path), "model.quantization": "fp4"})
    with pytest.raises(ValueError, match=r"model\.quantization=fp4 cannot run"):
        setup.build_binding(cfg, torch.device("cpu"))


@pytest.mark.parametrize(
    "sets,needle",
    [
        (
            {"model.quantization": "nf4", "model.backbone_delta": "merge"},
            "backbone_delta=merge cannot add deltas to nf4",
        ),
        ({"lora.init": "pissa", "model.dtype": "bfloat16"}, "lora.init=pissa moves each weight's top-r part"),
        ({"lora.init": "pissa", "model.quantization": "int8"}, "model.quantization=int8"),
        ({"model.quantization": "int4"}, "model.quantization='int4' is not allowed"),
        ({"model.side_max_rank": "-1"}, "model.side_max_rank=-1 is below the minimum 0"),
        ({"model.side_rtol": "inf"}, "model.side_rtol=inf is not a finite number"),
    ],
)
def test_combinations_that_cannot_be_exact_are_refused_by_key(tmp_path, sets, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        load_config(preset_path("ci"), {"output_dir": str(tmp_path), **sets})


@needs_bnb
def test_4bit_layers_keep_training_after_an_eval_forward(tmp_path):
    """bitsandbytes repacks a 4-bit weight for its CPU kernel at the first eval-mode forward on a
    CPU with AVX512-BF16; a repacked layer then passes no gradient and no longer dequantizes with
    its quant state. fedlora's loader turns that off: after an evaluation the layer's weight is
    the same and its input gradient is the dequantized weight's."""
    import bitsandbytes as bnb

    from fedlora.model.loading import load_model
    from helpers import tiny_llama

    model = load_model(str(tiny_llama(tmp_path / "tiny")), dtype=torch.bfloat16, quantization="nf4")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.support_avx512bf16_for_cpu is False for m in layers)
    layer = layers[0]
    before = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16)
    model.eval()
    with torch.no_grad():
        layer(x)  # where bitsandbytes would repack
    model.train()
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    after = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    assert torch.equal(before, after)
    x.requires_grad_(True)
    layer(x).float().sum().backward()
    assert x.grad is not None
    assert torch.allclose(x.grad.float(), before.sum(0).expand_as(x), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None or not __import__("bitsandbytes").functional.has_avx512bf16(),
    reason="the repacking happens only on CPUs with AVX512-BF16",
)
def test_without_it_an_eval_forward_repacks_the_weight_and_the_gradient_stops():
    """The control: what bitsandbytes does to a layer left as it builds it; keep_4bit_layout then
    refuses the repacked weight (its inverse does not give the same weight back)."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(32, 64, dtype=torch.bfloat16), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 64, dtype=torch.bfloat16))
    assert layer.weight.quant_state.packing_format_for_cpu
    layer.train()
    x = torch.randn(2, 64, dtype=torch.bfloat16, requires_grad=True)
    with pytest.warns(UserWarning, match="autograd kernel was not registered"):
        layer(x).float().sum().backward()
    assert x.grad is None  # no autograd through the repacked kernel: nothing reaches the input
    with pytest.raises(ValueError, match="already repacked"):
        Q.keep_4bit_layout(torch.nn.Sequential(layer))
    from fedlora.model.backbone import dense_weight

    with pytest.raises(ValueError, match="0: its 4-bit weight was repacked"):  # not read as garbage
        dense_weight(torch.nn.Sequential(layer), "0")
