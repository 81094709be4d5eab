"""`fedlora aggregate` round-tripped through real PEFT adapters on real (offline) models.

The new global adapter must load with ``PeftModel.from_pretrained`` and, with the backbone
delta applied, compute exactly the function the method's formula says.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedlora.cli import main
from fedlora.lowrank import lora_scale
from fedlora.model.adapter_io import load_deltas, read_adapter
from fedlora.model.backbone import apply_backbone_delta, target_weight

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

WEIGHTS = [1.0, 2.0, 4.0]


def _minilm():
    from fedlora.model.loading import load_model

    try:
        return load_model("offline:minilm", "seq_cls", num_labels=3)
    except ValueError as exc:  # package not installed
        pytest.skip(str(exc))


def _tiny_gpt2():
    """A GPT-2 (Conv1D layers, fan_in_fan_out) built from a config: no download."""
    cfg = transformers.GPT2Config(n_layer=2, n_embd=24, n_head=2, vocab_size=50, n_positions=16)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


MODELS = {
    "minilm": (_minilm, dict(target_modules=["query", "value"], task_type="SEQ_CLS"), 5),
    "gpt2": (_tiny_gpt2, dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True), 3),
}


def _inputs(model):
    gen = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    return torch.randint(3, min(vocab, 1000), (2, 7), generator=gen)


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


@pytest.fixture(scope="module", params=sorted(MODELS))
def clients(request, tmp_path_factory):
    """A base model, the round-start global adapter and three trained-looking client adapters."""
    make, lora_kwargs, rank = MODELS[request.param]
    base = make()
    root = tmp_path_factory.mktemp(request.param)
    cfg = peft.LoraConfig(r=rank, lora_alpha=7, **lora_kwargs)  # alpha/r != 1: scale matters
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a non-trivial global state (B != 0), like a later round
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    pm.save_pretrained(root / "global")
    start = {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_" in n}
    dirs = []
    for c in range(3):
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_(start[n] + torch.randn(p.shape, generator=gen) * 0.1)
        pm.save_pretrained(root / f"client{c}")
        dirs.append(root / f"client{c}")
    return base, root, dirs, rank


def _aggregate(root, dirs, method, name, *extra):
    out = root / name
    args = ["aggregate", "--method", method, *map(str, dirs), "--global", str(root / "global"), "--out", str(out)]
    args += ["--weights", *map(str, WEIGHTS), *extra]
    assert main(args) == 0
    return out


def _exact_reference(base, dirs, rank):
    """Base weights + s * sum_i p_i B_i A_i, dense in float64, no adapter."""
    ref = copy.deepcopy(base)
    p = torch.tensor(WEIGHTS, dtype=torch.float64) / sum(WEIGHTS)
    adapters = [read_adapter(d) for d in dirs]
    s = lora_scale(7, rank)
    for m in adapters[0].factors:
        dense = sum(pi * a.factors[m].B.double() @ a.factors[m].A.double() for pi, a in zip(p, adapters))
        w, fan = target_weight(ref, m)
        w.data += (s * (dense.T if fan else dense)).to(w.dtype)
    return ref


def _loaded(base, out):
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(out))
    delta_file = out / "backbone_delta.safetensors"
    if delta_file.exists():
        apply_backbone_delta(model, load_deltas(delta_file))
    return model


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize(
    "method,settings",
    [("fedmomentum", ["--set", "tau=1", "--device", d]) for d in DEVICES] + [("fedex_lora", []), ("flora", [])],
)
def test_exact_methods_reproduce_the_ideal_update(clients, method, settings):
    base, root, dirs, rank = clients
    out = _aggregate(root, dirs, method, f"{method}-exact", *settings)
    ids = _inputs(base)
    got = _logits(_loaded(base, out), ids)
    want = _logits(_exact_reference(base, dirs, rank), ids)
    naive = _logits(_loaded(base, _aggregate(root, dirs, "fedit", f"fedit-for-{method}")), ids)
    err = (got - want).abs().max().item()
    assert err < 1e-4 * max(1.0, want.abs().max().item())
    assert (naive - want).abs().max().item() > 10 * err  # FedIT really differs: the test can fail


def test_fedmomentum_adapter_is_balanced_rank_r(clients):
    base, root, dirs, rank = clients
    out = _aggregate(root, dirs, "fedmomentum", "fedmomentum-default")
    adapter = read_adapter(out)
    assert adapter.rank == rank
    for f in adapter.factors.values():
        torch.testing.assert_close(f.B.double().T @ f.B.double(), f.A.double() @ f.A.double().T, atol=1e-5, rtol=1e-4)
    report = json.loads((out / "aggregation.json").read_text())
    assert report["method"] == "fedmomentum" and report["next_round"] == 1
    lora_bytes = sum(
        t.numel() * 4 for d in dirs for k, t in load_file(str(d / "adapter_model.safetensors")).items() if ".lora_" in k
    )
    assert report["bytes_up"] == lora_bytes


def test_fedit_output_is_the_factor_mean(clients):
    base, root, dirs, rank = clients
    out = _aggregate(root, dirs, "fedit", "fedit-mean")
    got = read_adapter(out)
    adapters = [read_adapter(d) for d in dirs]
    p = [w / sum(WEIGHTS) for w in WEIGHTS]
    for m, f in got.factors.items():
        torch.testing.assert_close(f.A, sum(pi * a.factors[m].A for pi, a in zip(p, adapters)))
        torch.testing.assert_close(f.B, sum(pi * a.factors[m].B for pi, a in zip(p, adapters)))
    # PEFT loads it with no missing or unexpected LoRA keys
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(out))
    loaded = {n: p for n, p in model.named_parameters() if "lora_A" in n}
    assert len(loaded) == len(got.factors)


def _corrupt(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    tensors = load_file(str(src / "adapter_model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst


def _first_key(tensors, suffix):
    return sorted(k for k in tensors if k.endswith(suffix))[0]


def _set_nan(t):
    k = _first_key(t, "lora_B.weight")
    t[k] = t[k].clone()
    t[k][0, 0] = float("nan")


def _wrong_shape(t):
    k = _first_key(t, "lora_A.weight")
    t[k] = torch.zeros(t[k].shape[0], t[k].shape[1] + 1)


def _wrong_rank(t):
    for suffix in ("lora_A.weight", "lora_B.weight"):
        for k in [k for k in t if k.endswith(suffix)]:
            t[k] = (t[k][:-1] if suffix.startswith("lora_A") else t[k][:, :-1]).contiguous()


def _drop_module(t):
    k = _first_key(t, "lora_A.weight")
    del t[k]
    del t[k.replace("lora_A", "lora_B")]


@pytest.mark.parametrize(
    "edit,needle",
    [(_set_nan, "non-finite"), (_wrong_shape, "but"), (_wrong_rank, "rank"), (_drop_module, "module")],
)
def test_bad_client_is_named_and_nothing_is_written(clients, tmp_path, capsys, edit, needle):
    base, root, dirs, rank = clients
    bad = _corrupt(dirs[1], tmp_path / "bad", edit)
    out = tmp_path / "out"
    code = main(
        [
            "aggregate",
            "--method",
            "fedmomentum",
            str(dirs[0]),
            str(bad),
            "--global",
            str(root / "global"),
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert str(bad) in err and needle in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_unreadable_inputs_and_settings(clients, tmp_path, capsys):
    base, root, dirs, rank = clients
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--method", "fedmomentum", str(empty)], "adapter_config.json is missing"),
        (["--method", "nope", str(dirs[0])], "unknown method"),
        (["--method", "fedmomentum", "--set", "tau=2", str(dirs[0])], "tau"),
        (["--method", "fedmomentum", "--set", "bogus=1", str(dirs[0])], "unknown key 'bogus'"),
        (["--method", "fedrot_lora", "--round", "3", str(dirs[0])], "--global"),
    ]
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "adapter_config.json").write_text((dirs[0] / "adapter_config.json").read_text())
    (garbage / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    cases.append((["--method", "fedit", str(garbage)], "unreadable"))
    for args, needle in cases:
        out = tmp_path / "never"
        assert main(["aggregate", *args, "--out", str(out)]) == 2
        assert needle in capsys.readouterr().err
        assert not out.exists()


def test_console_script_runs(clients, tmp_path):
    base, root, dirs, rank = clients
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "fedlora.cli", "aggregate", "--method", "fedrot_lora", *map(str, dirs)]
    cmd += ["--global", str(root / "global"), "--round", "1", "--set", "lam=0.5", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "adapter_model.safetensors").exists() and not (out / "backbone_delta.safetensors").exists()


def _with_config(src: Path, dst: Path, config_text: str) -> Path:
    dst.mkdir()
    (dst / "adapter_config.json").write_text(config_text)
    (dst / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    return dst


def test_hostile_inputs_are_refused_by_name_before_anything_is_computed(clients, tmp_path, capsys):
    """Issue #17's probe of `fedlora aggregate`: each was a traceback, an accepted NaN, a NaN
    written into the output or an error after the computation."""
    base, root, dirs, rank = clients
    config = json.loads((dirs[0] / "adapter_config.json").read_text())
    cases = []
    for text, needle in [
        ("[]", "must hold a JSON object, got list"),
        ('"lora"', "must hold a JSON object, got str"),
        ("null", "must hold a JSON object, got NoneType"),
        (json.dumps({**config, "lora_alpha": float("nan")}), "lora_alpha must be a positive finite number"),
        (json.dumps({**config, "lora_alpha": float("inf")}), "lora_alpha must be a positive finite number"),
        (json.dumps({**config, "lora_alpha": True}), "lora_alpha must be a positive finite number, got True"),
        (json.dumps({**config, "use_rslora": "yes"}), "use_rslora must be true or false, got 'yes'"),
    ]:
        bad = _with_config(dirs[0], tmp_path / f"cfg{len(cases)}", text)
        cases.append((["--method", "fedit", str(bad)], needle))
    nan_global = _corrupt(root / "global", tmp_path / "nan-global", _set_nan)
    cases += [
        (["--method", "fedrot_lora", *map(str, dirs), "--global", str(nan_global), "--round", "1"], "non-finite"),
        (["--method", "fedit", *map(str, dirs), "--weights", "inf", "1", "1"], "--weights inf 1 1: each must be"),
        (["--method", "fedit", *map(str, dirs), "--weights", "0", "0", "0"], "their sum positive"),
        (["--method", "fedit", *map(str, dirs), "--weights", "-1", "1", "1"], "finite number >= 0"),
        (["--method", "fedit", *map(str, dirs), "--round", "-5"], "--round -5: rounds count from 0"),
    ]
    assert len(dirs) == 3
    for args, needle in cases:
        out = tmp_path / "never"
        assert main(["aggregate", *args, "--out", str(out)]) == 2, args
        err = capsys.readouterr().err
        assert needle in err, (args, err)
        assert not out.exists()
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    assert main(["aggregate", "--method", "fedit", *map(str, dirs), "--out", str(link)]) == 2
    assert "symbolic link" in capsys.readouterr().err and not any(real.iterdir())
