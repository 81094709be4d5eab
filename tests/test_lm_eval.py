"""``fedlora eval RUN --harness lm-eval``: lm-evaluation-harness scores the run's final model as
fedlora builds it in memory (base + backbone delta + adapter), offline, on two tiny local tasks
(tests/data/lm_eval: multiple choice and loglikelihood over 8 JSON lines).

The loglikelihood task's perplexity is continuous: equal to the perplexity computed here from
:func:`fedlora.engine.evaluate.load_model_for_eval`'s model (and different from the untuned base's),
so lm-eval scored those weights; the multiple-choice accuracy equals the argmax of the same
log-probabilities."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch

from fedlora.cli import main
from fedlora.configs import preset_path
from fedlora.engine.config import load_config
from fedlora.engine.local import run_experiment
from helpers import tiny_llama

if importlib.util.find_spec("lm_eval") is None:
    pytest.skip("needs lm-eval (pip install 'fedlora[eval]')", allow_module_level=True)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

DATA = Path(__file__).parent / "data" / "lm_eval"
TASKS = "fedlora_tiny_mc,fedlora_tiny_ll"
ROWS = [json.loads(line) for line in (DATA / "tiny_mc.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    folder = tiny_llama(root / "base")
    cfg = load_config(
        preset_path("ci"),
        {
            "output_dir": str(root),
            "name": "tiny",
            "model.name": str(folder),
            "method.name": "fedmomentum",  # changes the backbone: the harness must see the delta too
            "method.settings": "{tau: 1.0}",
            "task.settings": "{n_train: 24, n_test: 2, max_new_tokens: 4, max_length: 64}",
            "partition.num_clients": "2",
            "rounds.num_rounds": "2",
            "rounds.clients_per_round": "2",
            "rounds.eval_baseline": "false",
            "train.max_steps": "2",
            "train.lr": "2.0e-2",
        },
    )
    run_experiment(cfg, progress=False)
    from fedlora.model.adapter_io import load_deltas

    assert any(d.rank for d in load_deltas(root / "tiny" / "final" / "backbone_delta.safetensors").values())
    return root / "tiny"


def _loglikelihoods(model, tok, context: str, continuations: list[str]) -> list[float]:
    """lm-eval's HFLM scoring, by hand: the context's trailing spaces move to the continuation,
    the continuation's tokens are those of ``context + continuation`` past the context's."""
    out = []
    for cont in continuations:
        ctx_ids = tok(context, add_special_tokens=False)["input_ids"]
        whole = tok(context + cont, add_special_tokens=False)["input_ids"]
        cont_ids = whole[len(ctx_ids) :]
        ids = torch.tensor([ctx_ids + cont_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        target = ids[0, 1:][-len(cont_ids) :]
        out.append(float(logp[-len(cont_ids) :].gather(1, target[:, None]).sum()))
    return out


def _direct(model, tok) -> tuple[float, float]:
    """(perplexity of the right answers, multiple-choice accuracy) computed from ``model``."""
    lls, right = [], 0
    for row in ROWS:
        # " " + choice: the multiple-choice target_delimiter, and the loglikelihood task's own space
        scores = _loglikelihoods(model, tok, f"Question: {row['question']}\nAnswer:", [" " + c for c in row["choices"]])
        lls.append(scores[row["label"]])
        right += max(range(len(scores)), key=scores.__getitem__) == row["label"]
    return math.exp(-sum(lls) / len(lls)), right / len(ROWS)


def test_lm_eval_scores_the_in_memory_final_model(run, capsys, monkeypatch):
    from fedlora.engine.evaluate import load_model_for_eval

    monkeypatch.chdir(DATA)  # the task YAMLs name their data file relative to the working directory
    assert main(["eval", str(run), "--harness", "lm-eval", "--tasks", TASKS, "--include-path", str(DATA)]) == 0
    out = capsys.readouterr().out
    path = run / "eval" / "lm_eval.json"
    assert f"wrote {path}" in out and "fedlora_tiny_mc" in out and "perplexity" in out
    result = json.loads(path.read_text())
    assert result["harness"] == "lm-eval" and result["harness_version"] == importlib.metadata.version("lm_eval")
    assert result["tasks"] == ["fedlora_tiny_mc", "fedlora_tiny_ll"]
    assert result["adapter"] == str(run / "final") and result["backbone_delta"] is True
    assert result["n_samples"]["fedlora_tiny_mc"]["effective"] == len(ROWS)
    assert result["n_shot"] == {"fedlora_tiny_mc": 0, "fedlora_tiny_ll": 0}
    assert result["configs"]["fedlora_tiny_ll"]["output_type"] == "loglikelihood"
    assert result["options"]["include_path"] == [str(DATA)] and result["options"]["limit"] is None

    cfg = load_config(run / "config.yaml")
    model, tok, _ = load_model_for_eval(cfg, run / "final")
    ppl, acc = _direct(model, tok)
    assert result["results"]["fedlora_tiny_ll"]["perplexity,none"] == pytest.approx(ppl, rel=1e-5)
    assert result["results"]["fedlora_tiny_mc"]["acc,none"] == pytest.approx(acc)
    base, base_tok, _ = load_model_for_eval(cfg, None)
    base_ppl, _ = _direct(base, base_tok)
    assert abs(base_ppl - ppl) > 1e-3 * ppl  # the adapter and delta moved it: the final model was scored


def test_limit_fewshot_and_out(run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(DATA)
    out = tmp_path / "x.json"
    argv = ["eval", str(run), "--harness", "lm-eval", "--tasks", "fedlora_tiny_mc", "--include-path", "."]
    more = ["--limit", "3", "--num-fewshot", "1", "--batch-size", "2", "--adapter", str(run / "final")]
    assert main([*argv, *more, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["adapter"] == str(run / "final")
    assert result["n_samples"]["fedlora_tiny_mc"]["effective"] == 3 and result["n_shot"]["fedlora_tiny_mc"] == 1
    assert result["options"]["limit"] == 3 and result["options"]["batch_size"] == 2


def test_errors_come_before_the_model_loads(run, tmp_path, monkeypatch, capsys):
    import fedlora.engine.evaluate as evaluate

    monkeypatch.setattr(evaluate, "load_model_for_eval", lambda *a, **k: pytest.fail("the model was loaded"))
    base = ["eval", str(run), "--harness", "lm-eval"]
    cases = [
        ([*base, "--tasks", "fedlora_tiny_nope", "--include-path", str(DATA)], "unknown lm-eval task"),
        ([*base, "--tasks", "fedlora_tiny_mc", "--include-path", str(tmp_path / "none")], "no such file"),
        # run from elsewhere, the task's relative data file is missing: its dataset cannot be built
        ([*base, "--tasks", "fedlora_tiny_mc", "--include-path", str(DATA)], "could not build task(s) fedlora_tiny_mc"),
        ([*base, "--tasks", "fedlora_tiny_mc", "--batch-size", "0"], None),
        ([*base], "needs --tasks"),
        ([*base, "--tasks", "fedlora_tiny_mc", "--adapter", str(tmp_path)], "not a PEFT adapter folder"),
        (["eval", str(tmp_path), "--harness", "lm-eval", "--tasks", "x"], "evaluates a run folder"),
        (["eval", str(run), "--tasks", "fedlora_tiny_mc"], "goes with --harness"),
    ]
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((run / "config.yaml").read_text())
    cases.append((["eval", str(unfinished), "--harness", "lm-eval", "--tasks", "x"], "no final/ adapter"))
    monkeypatch.chdir(tmp_path)
    for argv, message in cases:
        if message is None:  # argparse refuses it: exit status 2
            with pytest.raises(SystemExit) as exc:
                main(argv)
            assert exc.value.code == 2 and "--batch-size" in capsys.readouterr().err
            continue
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv


def test_a_missing_harness_names_the_package(run, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    assert main(["eval", str(run), "--harness", "lm-eval", "--tasks", "arc_easy"]) == 2
    err = capsys.readouterr().err
    assert "lm-eval" in err and "pip install 'fedlora[eval]'" in err
