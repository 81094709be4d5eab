"""GSM8K-format math examples from local JSONL / JSON / CSV / parquet files and (offline) the hub."""

from __future__ import annotations

import csv
import gzip
import json

import pytest

from fedlora.data.sources import SourceError
from fedlora.tasks.math.gsm8k import (
    final_from_answer,
    load_local,
    load_source,
    solution_steps,
    split_before_partition,
    step_bucket,
)

# Three real GSM8K training rows (format: worked lines with calculator annotations, then ####).
GSM8K_ROWS = [
    {
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
    },
    {
        "question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
        "How much did she earn?",
        "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
        "Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10",
    },
    {
        "question": "Betty is saving money for a new wallet which costs $100. Betty has only half of the money she "
        "needs. Her parents decided to give her $15 for that purpose, and her grandparents twice as much as "
        "her parents. How much more money does Betty need to buy the wallet?",
        "answer": "In the beginning, Betty has only 100 / 2 = $<<100/2=50>>50.\n"
        "Betty's grandparents gave her 15 * 2 = $<<15*2=30>>30.\n"
        "This means, Betty needs 100 - 50 - 30 - 15 = $<<100-50-30-15=5>>5 more.\n#### 5",
    },
    {"question": "A big one?", "answer": "It is 1,000 + 200 = 1,200.\n#### 1,200"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_gsm8k_jsonl_loads(tmp_path):
    res = load_local(write_jsonl(tmp_path / "gsm8k_train.jsonl", GSM8K_ROWS))
    assert res.dropped == 0 and len(res.examples) == 4
    finals = [ex["final"] for ex in res.examples]
    assert finals == ["72", "10", "5", "1200"]
    assert [ex["category"] for ex in res.examples] == ["steps_1-2", "steps_1-2", "steps_3", "steps_1-2"]
    assert res.examples[0]["question"] == GSM8K_ROWS[0]["question"]
    assert res.examples[0]["answer"] == GSM8K_ROWS[0]["answer"]
    assert set(res.examples[0]) == {"question", "answer", "final", "category"}


def test_category_fallbacks_and_mapped_columns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", GSM8K_ROWS)
    mag = load_local(path, category_fallback="magnitude").examples
    assert [ex["category"] for ex in mag] == ["digits_2", "digits_2", "digits_1", "digits_4+"]
    const = load_local(path, category_fallback="const:gsm8k").examples
    assert {ex["category"] for ex in const} == {"gsm8k"}
    with pytest.raises(SourceError, match="category_fallback"):
        load_local(path, category_fallback="bogus")
    rows = [{"q": "What is 2+2?", "sol": "2+2=4", "topic": "arith", "gold": "4.0"}]
    ex = load_local(write_jsonl(tmp_path / "m.jsonl", rows), columns={
        "question": "q", "answer": "sol", "category": "topic", "final": "gold"}).examples  # fmt: skip
    assert ex == [{"question": "What is 2+2?", "answer": "2+2=4", "final": "4", "category": "arith"}]


def test_metamath_style_answers_and_other_formats(tmp_path):
    rows = [
        {"query": "Tom has 3 apples and buys 4. How many?", "response": "3 + 4 = 7. The answer is: 7"},
        {"query": "No number here?", "response": "I do not know."},
    ]
    cols = {"question": "query", "answer": "response"}
    # JSON list, gzipped JSONL, CSV and parquet give the same examples
    (tmp_path / "a.json").write_text(json.dumps(rows))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as fh:
        fh.write("\n".join(json.dumps(r) for r in rows))
    with open(tmp_path / "c.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["query", "response"])
        w.writeheader()
        w.writerows(rows)
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    results = [load_local(tmp_path / f, columns=cols) for f in ("a.json", "b.jsonl.gz", "c.csv", "d.parquet")]
    for res in results:
        assert res.dropped == 1  # no final number: dropped, counted
        assert res.examples == results[0].examples
    assert results[0].examples[0]["final"] == "7"


def test_missing_columns_and_files_are_clear(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"query": "q", "response": "#### 1"}])
    with pytest.raises(SourceError, match=r"columns not found: question -> 'question'"):
        load_local(path)
    with pytest.raises(SourceError, match="not found"):
        load_source(str(tmp_path / "missing.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\nnot json\n')
    with pytest.raises(SourceError, match=r"bad\.jsonl:2"):
        load_local(tmp_path / "bad.jsonl")


def test_folder_with_splits(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", GSM8K_ROWS[:3])
    sub = tmp_path / "main"
    sub.mkdir()
    write_jsonl(sub / "test-00000-of-00001.jsonl", GSM8K_ROWS[3:])
    assert len(load_source(str(tmp_path), split="train").examples) == 3
    assert [e["final"] for e in load_source(str(tmp_path), split="test").examples] == ["1200"]
    with pytest.raises(SourceError, match="no 'validation' data files"):
        load_source(str(tmp_path), split="validation")


def test_hub_offline_fails_clearly(monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setenv("HF_DATASETS_CACHE", "/nonexistent/fedlora-test-cache")
    with pytest.raises(SourceError) as info:
        load_source("openai/gsm8k", split="test")
    msg = str(info.value)
    assert "openai/gsm8k" in msg and "HF_HUB_OFFLINE" in msg
    assert "local file" in msg and ".jsonl" in msg


def test_answer_helpers():
    assert final_from_answer("a\nb\n#### 1,234") == "1234"
    assert final_from_answer("x = 3\n####   -5 apples") == "-5"
    assert final_from_answer("no marker, the answer is 8.") == "8"
    assert final_from_answer("nothing") is None
    assert solution_steps("a\n\nb\nc\n#### 3") == 3
    assert [step_bucket(s) for s in (1, 2, 3, 4, 5, 6, 7, 9)] == [
        "steps_1-2", "steps_1-2", "steps_3", "steps_4", "steps_5-6", "steps_5-6", "steps_7+", "steps_7+"]  # fmt: skip


def test_split_before_partition():
    rows = [{"question": f"q{i % 45}", "answer": "#### 1"} for i in range(50)]  # 5 duplicated questions
    train, test = split_before_partition(rows, 10, seed=0)
    assert len(test) == 10
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    assert len(train) + len(test) <= 50
    assert (train, test) == split_before_partition(rows, 10, seed=0)
    with pytest.raises(SourceError):
        split_before_partition(rows, 50, seed=0)
