"""The general row layer: file readers, folders of split files, the hub loader, subsampling and hold-outs."""

from __future__ import annotations

import csv
import gzip
import json

import pytest

from fedlora.data.sources import (
    LOCAL_HINT,
    SourceError,
    drop_overlap,
    holdout,
    hub_rows,
    is_dir,
    is_local,
    is_single_file,
    read_records,
    read_rows,
    rename_columns,
    split_files,
    subsample,
)

ROWS = [{"text": "first", "label": 1}, {"text": "second", "label": 0}, {"text": "third", "label": 1}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_read_records_formats_and_errors(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    (tmp_path / "b.json").write_text(json.dumps({"data": ROWS}))
    write_jsonl(tmp_path / "c.json", ROWS)  # JSON lines named .json
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as fh:
        fh.write("\n".join(json.dumps(r) for r in ROWS))
    for name in ("a.json", "b.json", "c.json", "d.jsonl.gz"):
        assert read_records(tmp_path / name) == ROWS
    with open(tmp_path / "e.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(ROWS)
    assert read_records(tmp_path / "e.csv") == [{"text": r["text"], "label": str(r["label"])} for r in ROWS]
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "f.parquet")
    assert read_records(tmp_path / "f.parquet") == ROWS
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\nnot json\n')
    with pytest.raises(SourceError, match=r"bad\.jsonl:2: invalid JSON line"):
        read_records(tmp_path / "bad.jsonl")
    (tmp_path / "obj.json").write_text(json.dumps({"items": ROWS}))
    with pytest.raises(SourceError, match="'data', 'rows' or 'examples'"):
        read_records(tmp_path / "obj.json")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(SourceError, match="unsupported file type"):
        read_records(tmp_path / "x.txt")
    with pytest.raises(SourceError, match="data file not found"):
        read_records(tmp_path / "missing.jsonl")


def test_read_rows_of_a_file_a_folder_and_its_splits(tmp_path):
    path = write_jsonl(tmp_path / "all.jsonl", ROWS)
    assert is_local(str(path)) and is_single_file(str(path)) and not is_dir(str(path))
    assert read_rows(str(path), split="test") == (ROWS, str(path))  # a single file has no splits
    folder = tmp_path / "repo"
    (folder / "main").mkdir(parents=True)
    (folder / ".cache").mkdir()
    write_jsonl(folder / "train.jsonl", ROWS[:2])
    write_jsonl(folder / "main" / "test-00000-of-00001.jsonl", ROWS[2:])
    write_jsonl(folder / ".cache" / "test.jsonl", ROWS)  # hidden folders are skipped
    assert is_dir(str(folder)) and not is_single_file(str(folder))
    assert [p.name for p in split_files(folder, "test")] == ["test-00000-of-00001.jsonl"]
    assert read_rows(str(folder)) == (ROWS[:2], f"{folder} [train]")
    assert read_rows(str(folder), split="test") == (ROWS[2:], f"{folder} [test]")
    with pytest.raises(SourceError, match="no 'validation' data files"):
        read_rows(str(folder), split="validation")
    with pytest.raises(SourceError, match="data file not found"):
        read_rows(str(tmp_path / "missing.jsonl"))
    assert not is_local("some-org/some-dataset")
    renamed = rename_columns(ROWS, {"sentence": "text"}, "origin")
    assert [r["sentence"] for r in renamed] == [r["text"] for r in ROWS]
    with pytest.raises(SourceError, match=r"origin: columns not found: sentence -> 'body'"):
        rename_columns(ROWS, {"sentence": "body"}, "origin")


def test_hub_rows_offline_is_a_clear_error(monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setenv("HF_DATASETS_CACHE", "/nonexistent/fedlora-test-cache")
    with pytest.raises(SourceError) as info:
        read_rows("some-org/some-dataset", split="validation", config="cfg")
    msg = str(info.value)
    assert msg.startswith("cannot load the hub dataset some-org/some-dataset (config 'cfg'), split 'validation'")
    assert "HF_HUB_OFFLINE" in msg
    assert "load_dataset('some-org/some-dataset', 'cfg', split='validation').to_json('validation.jsonl')" in msg
    assert msg.endswith(f", and {LOCAL_HINT}")
    with pytest.raises(SourceError, match=r"\.to_json\('train\.jsonl'\), and do something else\.$"):
        hub_rows("some-org/some-dataset", "train", local_hint="do something else.")


def test_subsample_holdout_and_drop_overlap():
    items = list(range(100))
    picked = subsample(items, 10, "0:train")
    assert len(picked) == 10 and picked == sorted(picked) and picked == subsample(items, 10, "0:train")
    assert picked != subsample(items, 10, "1:train")
    assert subsample(items, 0, 0) == items and subsample(items, 200, 0) == items
    rows = [{"q": f"q{i % 45}"} for i in range(50)]  # 5 duplicated questions
    train, test = holdout(rows, 10, "0:holdout", lambda r: r["q"])
    assert len(test) == 10 and (train, test) == holdout(rows, 10, "0:holdout", lambda r: r["q"])
    assert not {r["q"] for r in train} & {r["q"] for r in test}
    for n in (0, 50):
        with pytest.raises(SourceError, match=f"cannot hold out {n} test examples from 50 rows"):
            holdout(rows, n, 0, lambda r: r["q"])
    kept, dropped = drop_overlap(rows, rows[:3], lambda r: r["q"])
    assert dropped == 6 and len(kept) == 44
