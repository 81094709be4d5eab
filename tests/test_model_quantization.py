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
