"""Rows of a data source, the layer every task reads through: local files, folders of split files, the hub.

* Files (:func:`read_records`): ``.jsonl``, ``.json`` (a list, ``{"data": [...]}`` or JSON lines),
  ``.csv``, ``.parquet``; ``.jsonl.gz`` / ``.json.gz`` too (:data:`FILE_SUFFIXES`).
* Sources (:func:`read_rows`): a file (read whole: it has no splits), a folder holding
  ``<split>*.{jsonl,json,csv,parquet}`` files (e.g. a clone of a hub dataset repository; found
  by :func:`split_files`), or a hub dataset id, read with ``datasets.load_dataset`` only when the
  machine can reach the hub or has the dataset cached (:func:`hub_rows`). Offline
  (``HF_HUB_OFFLINE=1``) or without network, a hub id fails with a :class:`SourceError` naming the
  dataset and how to use a local file instead.
* Rows to examples: :func:`rename_columns` (a ``{field: column}`` mapping), :func:`subsample`
  (seeded, order kept), :func:`holdout` (a seeded test hold-out before any client partition) and
  :func:`drop_overlap` (train rows whose key is also in test).

Each task turns these rows into its own examples.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import json
import os
import random
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

Row = dict[str, Any]

FILE_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".csv", ".parquet", ".jsonl.gz", ".json.gz")
# what a hub error advises to do with the downloaded file (after "..., and ")
LOCAL_HINT = (
    "use the local file, or a folder of split files such as train.jsonl and validation.jsonl, as the source instead."
)


class SourceError(ValueError):
    """A data source that cannot be read (missing file, bad columns, hub unreachable)."""


# ---- files -------------------------------------------------------------------------------------
def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in sorted(FILE_SUFFIXES, key=len, reverse=True):
        if name.endswith(s):
            return s
    return path.suffix.lower()


def _json_lines(text: str, origin: Path) -> list[dict[str, Any]]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise SourceError(f"{origin}:{lineno}: invalid JSON line: {exc}") from exc
    return rows


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a JSONL / JSON (a list, or ``{"data": [...]}``) / CSV / parquet file."""
    p = Path(path)
    if not p.is_file():
        raise SourceError(f"data file not found: {p}")
    suffix = _suffix(p)
    if suffix in (".jsonl", ".jsonl.gz", ".json", ".json.gz"):
        with gzip.open(p, "rt", encoding="utf-8") if suffix.endswith(".gz") else open(p, encoding="utf-8") as fh:
            text = fh.read()
        if suffix.startswith(".jsonl"):
            return _json_lines(text, p)
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return _json_lines(text, p)  # many ".json" dataset files are really JSON lines
        if isinstance(data, dict):
            for key in ("data", "rows", "examples"):
                if isinstance(data.get(key), list):
                    return list(data[key])
            raise SourceError(f"{p}: a JSON object must hold its rows as a list under 'data', 'rows' or 'examples'")
        if not isinstance(data, list):
            raise SourceError(f"{p}: expected a list of rows, got {type(data).__name__}")
        return data
    if suffix == ".csv":
        with open(p, encoding="utf-8", newline="") as fh:
            return list(csv.DictReader(fh))
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:  # pragma: no cover - pyarrow comes with datasets
            raise SourceError(f"{p}: reading parquet needs pyarrow (pip install pyarrow)") from exc
        return pq.read_table(p).to_pylist()
    raise SourceError(f"{p}: unsupported file type; use one of {', '.join(FILE_SUFFIXES)}")


def split_files(folder: str | os.PathLike[str], split: str) -> list[Path]:
    """Data files of ``split`` in ``folder`` (recursively): names starting with the split name."""
    root = Path(folder)
    found = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and _suffix(p) in FILE_SUFFIXES
        and p.name.lower().startswith(split.lower())
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    return found


# ---- sources -----------------------------------------------------------------------------------
def is_local(source: str) -> bool:
    """Whether ``source`` names a local file or folder (a known file suffix, or an existing path)."""
    p = Path(source).expanduser()
    return p.exists() or _suffix(p) in FILE_SUFFIXES or source.startswith((".", "/", "~"))


def is_dir(source: str) -> bool:
    return Path(source).expanduser().is_dir()


def is_single_file(source: str) -> bool:
    """A local source that is one file (no splits: a test set is held out of it)."""
    return is_local(source) and not is_dir(source)


# ---- hub ---------------------------------------------------------------------------------------
def _offline() -> bool:
    flags = (os.environ.get(v, "").strip().lower() for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if any(f in ("1", "true", "yes", "on") for f in flags):
        return True
    try:
        from huggingface_hub.constants import is_offline_mode
    except ImportError:  # pragma: no cover
        return False
    return bool(is_offline_mode())


@contextlib.contextmanager
def _offline_honoured() -> Iterator[None]:
    """Make ``datasets`` and ``huggingface_hub`` obey ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` as
    they are now: both read them once, at import, so a flag set later (a notebook, a test) was
    ignored and a missing dataset cost ~23 s of network retries before the same error."""
    if not _offline():
        yield
        return
    import datasets
    import huggingface_hub.constants as hub

    saved = (datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved


def hub_rows(dataset_id: str, split: str, config: str | None = None, *, local_hint: str = LOCAL_HINT) -> list[Row]:
    """Rows of a hub dataset split via ``datasets.load_dataset`` (cached copies work offline).

    When the dataset cannot be loaded, a :class:`SourceError` names it, why (offline mode, or no
    network / a wrong id / a missing config or split) and how to download it elsewhere
    (``datasets.load_dataset(...).to_json('<split>.jsonl')``), followed by ``local_hint``: what to
    do with that file (default :data:`LOCAL_HINT`).
    """
    what = dataset_id + (f" (config {config!r})" if config else "") + f", split {split!r}"
    hint = (
        f"Download it on a machine with hub access, e.g. datasets.load_dataset({dataset_id!r}"
        f"{', ' + repr(config) if config else ''}, split={split!r}).to_json('{split}.jsonl'), and {local_hint}"
    )
    try:
        import datasets
    except ImportError as exc:
        raise SourceError(f"cannot load the hub dataset {what}: the 'datasets' package is missing. {hint}") from exc
    try:
        with _offline_honoured():
            ds = datasets.load_dataset(dataset_id, config, split=split)
    except Exception as exc:
        reason = (
            "the hub is unreachable in offline mode (HF_HUB_OFFLINE=1) and no cached copy exists"
            if _offline()
            else "it could not be downloaded (no network access, a wrong id, or a missing config/split)"
        )
        raise SourceError(
            f"cannot load the hub dataset {what}: {reason} [{type(exc).__name__}: {str(exc)[:300]}]. {hint}"
        ) from exc
    return ds.to_list()


# ---- rows --------------------------------------------------------------------------------------
def read_rows(source: str, *, split: str = "train", config: str | None = None) -> tuple[list[Row], str]:
    """``(rows, origin)`` of ``split`` of a local file (read whole), a folder (its ``split*`` files)
    or a hub dataset id."""
    if is_local(source):
        p = Path(source).expanduser()
        if p.is_dir():
            files = split_files(p, split)
            if not files:
                raise SourceError(f"{p}: no {split!r} data files (names starting with {split!r})")
            rows: list[Row] = []
            for f in files:
                rows.extend(read_records(f))
            return rows, f"{p} [{split}]"
        return read_records(p), str(p)
    return hub_rows(source, split, config), f"hub:{source}" + (f"/{config}" if config else "") + f" [{split}]"


def rename_columns(rows: Sequence[Row], columns: Mapping[str, str], origin: str) -> list[Row]:
    """Rows with ``columns`` (``{field: column}``) read into the field names the adapters expect."""
    if not columns or not rows:
        return list(rows)
    missing = [f"{k} -> {v!r}" for k, v in columns.items() if v not in rows[0]]
    if missing:
        raise SourceError(f"{origin}: columns not found: {', '.join(missing)}; the rows have {sorted(rows[0])}")
    return [{**row, **{k: row[v] for k, v in columns.items()}} for row in rows]


def subsample(items: Sequence[Any], n: int, seed: int | str) -> list[Any]:
    """A seeded subset of ``n`` items in their original order (all when ``n <= 0``)."""
    if n <= 0 or n >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


def holdout(
    examples: Sequence[Row], n_test: int, seed: int | str, key: Callable[[Row], Hashable]
) -> tuple[list[Row], list[Row]]:
    """``(train, test)``: a seeded sample of ``n_test`` rows as test, the rest as train minus rows
    whose ``key`` also occurs in test (both in source order)."""
    if not 0 < n_test < len(examples):
        raise SourceError(f"cannot hold out {n_test} test examples from {len(examples)} rows")
    idx = set(random.Random(seed).sample(range(len(examples)), n_test))
    test = [examples[i] for i in sorted(idx)]
    seen = {key(ex) for ex in test}
    train = [ex for i, ex in enumerate(examples) if i not in idx and key(ex) not in seen]
    return train, test


def drop_overlap(train: Sequence[Row], test: Sequence[Row], key: Callable[[Row], Hashable]) -> tuple[list[Row], int]:
    """Train rows whose ``key`` is not in test, and how many were dropped."""
    seen = {key(ex) for ex in test}
    kept = [ex for ex in train if key(ex) not in seen]
    return kept, len(train) - len(kept)


__all__ = [
    "FILE_SUFFIXES",
    "LOCAL_HINT",
    "Row",
    "SourceError",
    "drop_overlap",
    "holdout",
    "hub_rows",
    "is_dir",
    "is_local",
    "is_single_file",
    "read_records",
    "read_rows",
    "rename_columns",
    "split_files",
    "subsample",
]
