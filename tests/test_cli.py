"""The ``fedlora`` command line's help texts, presets and errors that need no model (issue #21)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
import yaml

from fedlora.cli import build_parser, main
from fedlora.configs import is_study_spec, preset_names, preset_path

CONFIGS = resources.files("fedlora") / "configs"
SHIPPED = sorted(p.name[:-5] for p in CONFIGS.iterdir() if p.name.endswith(".yaml"))


def _help(*argv: str, capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


# ---- a: help texts --------------------------------------------------------------------------------
def test_export_help_says_what_it_merges_and_writes(capsys):
    text = " ".join(_help("export", capsys=capsys).split())
    for words in ("base model", "backbone delta", "final LoRA", "from_pretrained", "tokenizer"):
        assert words in text, words


def test_compare_help_says_what_it_prints_and_warns_about(capsys):
    text = " ".join(_help("compare", capsys=capsys).split())
    for words in ("FINAL", "not the running max", "--plot", "shared axes", "warning:", "test sets"):
        assert words in text, words


def test_every_subcommand_has_a_description():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and "run" in a.choices)
    missing = [name for name, p in sub.choices.items() if name != "methods" and not p.description]
    assert not missing


# ---- b: presets -----------------------------------------------------------------------------------
def test_presets_are_the_shipped_configs_that_are_not_study_specs():
    specs = [n for n in SHIPPED if "grid" in (yaml.safe_load((CONFIGS / f"{n}.yaml").read_text()) or {})]
    assert specs and all(n.startswith("study_") for n in specs)
    assert preset_names() == [n for n in SHIPPED if n not in specs]
    assert {"default", "ci", "glue_minilm", "code", "commonsense", "instruction", "shakespeare"} <= set(preset_names())
    assert all(is_study_spec(CONFIGS / f"{n}.yaml") for n in specs)


def test_run_help_lists_every_preset(capsys):
    text = " ".join(_help("run", capsys=capsys).split())
    for name in preset_names():
        assert name in text, name
    assert "study_" not in text


def test_unknown_preset_lists_the_presets_and_no_study_spec(capsys):
    with pytest.raises(ValueError, match="unknown preset 'nope'") as err:
        preset_path("nope")
    assert f"available: {', '.join(preset_names())}" in str(err.value)
    assert "study_" not in str(err.value)
    assert main(["run", "--preset", "nope"]) == 2
    assert "study_" not in capsys.readouterr().err


def test_a_study_spec_is_not_a_preset(capsys):
    with pytest.raises(ValueError, match="study spec, not a preset: run it with `fedlora study study_glue`"):
        preset_path("study_glue")
    assert main(["run", "--preset", "study_math"]) == 2
    assert "fedlora study study_math" in capsys.readouterr().err
    assert Path(str(preset_path("ci"))).name == "ci.yaml"


def test_a_preset_name_given_as_the_config_file_points_to_preset(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "ci"]) == 2
    assert "ci: no such file; the shipped preset runs with --preset ci" in capsys.readouterr().err
    assert main(["run", "nope"]) == 2  # not a preset either: the plain error
    assert "nope: cannot read" in capsys.readouterr().err


# ---- c: eval of a folder that is not there, or not a run/adapter folder ------------------------------
def test_eval_of_a_missing_folder_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "runs/nope"]) == 2
    err = capsys.readouterr().err
    assert "no such folder: runs/nope" in err and "--model" not in err


def test_eval_of_a_folder_that_is_neither_run_nor_adapter_says_so(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello\n")
    assert main(["eval", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}: not a run folder (no config.yaml) and not a PEFT adapter folder" in err
    assert main(["eval", str(tmp_path / "notes.txt")]) == 2
    assert "a file, not a run folder" in capsys.readouterr().err


# ---- d: compare warns about different test sets ----------------------------------------------------
def _run(root: Path, name: str, n_test: int, **settings) -> Path:
    run = root / name
    run.mkdir()
    records = [
        {"round": 0, "phase": "baseline", "eval": {"exact_match": 0.1, "n": n_test}, "bytes_total": 0},
        {"round": 1, "phase": "train", "train_loss": 1.0, "bytes_total": 10, "eval": {"exact_match": 0.2, "n": n_test}},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    protocol = {"task": "math", "seed": 0, "settings": {"source": "generated", "n_test": n_test, **settings}}
    (run / "protocol.json").write_text(json.dumps(protocol))
    return run


def test_compare_warns_when_the_test_sets_differ(tmp_path, capsys):
    a, b, c = _run(tmp_path, "small", 4), _run(tmp_path, "big", 40), _run(tmp_path, "same", 4)
    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    warning = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "different test sets" in warning[0]
    assert "test examples: 4 (small) vs 40 (big)" in out
    assert main(["compare", str(a), str(c)]) == 0
    assert "warning" not in capsys.readouterr().out


def test_a_run_whose_every_round_was_skipped_exits_non_zero_with_the_reason(tmp_path, capsys):
    from helpers import tiny_llama

    model = tiny_llama(tmp_path / "tiny")
    sets = [
        f"model.name={model}", f"output_dir={tmp_path}", "name=skipped", "rounds.min_clients=3",
        "task.settings={n_train: 24, n_test: 1, max_new_tokens: 2, max_length: 48}", "train.max_steps=1",
        "rounds.eval_baseline=false",
    ]  # fmt: skip
    rc = main(["run", "--preset", "ci", "--no-progress", *[a for s in sets for a in ("--set", s)]])
    err = capsys.readouterr().err
    assert rc == 1 and "every round was skipped" in err and "min_clients" in err
    lines = [json.loads(x) for x in (tmp_path / "skipped" / "metrics.jsonl").read_text().splitlines()]
    assert lines and all(r["skipped"] for r in lines)


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("model.device", "banana", "model.device='banana': not a device"),
        ("model.name", "/no/such/model", "model.name='/no/such/model': no such file or folder"),
        ("rounds.clients_per_round", "0", "rounds.clients_per_round=0.0 samples no client"),
        ("train.lr", "nan", "train.lr=nan is not a finite number"),
        ("lora.alpha", ".inf", "lora.alpha=inf is not a finite number"),
    ],
)
def test_bad_values_are_refused_by_key_before_a_model_loads(tmp_path, monkeypatch, capsys, key, value, needle):
    def no_model(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr("fedlora.model.loading.load_model", no_model)
    rc = main(["run", "--preset", "ci", "--set", f"output_dir={tmp_path}", "--set", f"{key}={value}"])
    assert rc == 2 and needle in capsys.readouterr().err


def test_a_gpu_the_machine_lacks_is_refused_before_anything_loads(tmp_path, monkeypatch):
    import torch

    from fedlora.engine.setup import device_for

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"model\.device='cuda:1' but this machine has no CUDA GPU"):
        device_for("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"model\.device='cuda:1' but this machine has 1 GPU\(s\): cuda:0\.\.cuda:0"):
        device_for("cuda:1")
