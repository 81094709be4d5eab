"""Loading math examples from local files or the Hugging Face hub, in the generator's format.

Protocol
--------
Every loader returns examples as dicts ``{"question", "answer", "final", "category"}`` (plus
any extra columns named in ``keep``), exactly like :func:`fedlora.data.math_generator.generate_math`:

* ``question`` / ``answer``: read through a column mapping (default GSM8K's own names,
  ``{"question": "question", "answer": "answer"}``; e.g. MetaMathQA needs
  ``{"question": "query", "answer": "response"}``).
* ``final``: the mapped ``final`` column if there is one, else the number after the answer's
  ``####`` line (GSM8K), else :func:`~fedlora.data.numbers.extract_final_number` of the answer;
  normalised (``"1,200"`` -> ``"1200"``). Rows without a final number are dropped (counted in
  :attr:`LoadResult.dropped`).
* ``category``: the mapped ``category`` column if there is one, else a fallback computed from the
  row (GSM8K has no category), chosen by ``category_fallback``:

  - ``"steps"`` (default): the number of reasoning lines before ``####`` (GSM8K writes one
    calculation per line), bucketed as ``steps_1-2``, ``steps_3``, ``steps_4``,
    ``steps_5-6``, ``steps_7+``: problem difficulty, a natural non-IID axis;
  - ``"magnitude"``: digits of the final answer: ``digits_1``, ``digits_2``, ``digits_3``,
    ``digits_4+`` (``negative`` / ``decimal`` for those);
  - ``"const:NAME"``: the same label ``NAME`` for every row.

Sources (:func:`load_source`): a file (``.jsonl``, ``.json``, ``.csv``, ``.parquet``;
``.jsonl.gz`` / ``.json.gz`` too), a folder holding ``<split>*.{jsonl,json,csv,parquet}`` files
(e.g. a clone of a hub dataset repository), or a hub dataset id (``openai/gsm8k``, config
``main``), read with ``datasets.load_dataset`` only when the machine can reach the hub or has
the dataset cached. Offline (``HF_HUB_OFFLINE=1``) or without network, a hub id fails with a
:class:`SourceError` naming the dataset and how to use a local file instead.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.data.numbers import extract_final_number, normalize_number

Example = dict[str, Any]

FILE_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".csv", ".parquet", ".jsonl.gz", ".json.gz")
GSM8K_COLUMNS: dict[str, str] = {"question": "question", "answer": "answer"}
CATEGORY_FALLBACKS = ("steps", "magnitude", "const:NAME")
# hub ids whose config must be named (load_dataset fails without one)
HUB_DEFAULT_CONFIGS: dict[str, str] = {"openai/gsm8k": "main", "gsm8k": "main"}


class SourceError(ValueError):
    """A data source that cannot be read (missing file, bad columns, hub unreachable)."""


@dataclass
class LoadResult:
    """Examples read from one source split, and how many rows were dropped (no final number)."""

    examples: list[Example]
    dropped: int = 0
    origin: str = ""
    info: dict[str, Any] = field(default_factory=dict)


# ---- answers -----------------------------------------------------------------------------------
_MARKER_LINE = re.compile(r"^\s*####\s*(.*)$", re.MULTILINE)


def final_from_answer(answer: str) -> str | None:
    """The final number of a worked answer: after ``####`` when present, else extracted."""
    m = _MARKER_LINE.search(answer)
    if m:
        value = normalize_number(m.group(1).strip().split()[0] if m.group(1).strip() else "")
        if value is not None:
            return value
    return extract_final_number(answer)


def solution_steps(answer: str) -> int:
    """Non-empty reasoning lines before the ``####`` line (GSM8K: one calculation per line)."""
    body = answer.split("####")[0]
    return sum(1 for line in body.splitlines() if line.strip())


def step_bucket(steps: int) -> str:
    """``steps_1-2``, ``steps_3``, ``steps_4``, ``steps_5-6`` or ``steps_7+``."""
    if steps <= 2:
        return "steps_1-2"
    if steps <= 4:
        return f"steps_{steps}"
    if steps <= 6:
        return "steps_5-6"
    return "steps_7+"


def magnitude_bucket(final: str) -> str:
    """``digits_1`` .. ``digits_4+``, ``negative`` or ``decimal`` for a normalised number."""
    if final.startswith("-"):
        return "negative"
    if "." in final:
        return "decimal"
    return f"digits_{len(final)}" if len(final) < 4 else "digits_4+"


def fallback_category(answer: str, final: str, fallback: str) -> str:
    """The category of a row without one (see the module docstring for ``fallback``)."""
    if fallback == "steps":
        return step_bucket(solution_steps(answer))
    if fallback == "magnitude":
        return magnitude_bucket(final)
    if fallback.startswith("const:") and len(fallback) > len("const:"):
        return fallback[len("const:") :]
    raise SourceError(f"unknown category_fallback {fallback!r}; allowed: {', '.join(CATEGORY_FALLBACKS)}")


def normalize_rows(
    rows: Sequence[Mapping[str, Any]],
    columns: Mapping[str, str] | None = None,
    *,
    category_fallback: str = "steps",
    keep: Sequence[str] = (),
    origin: str = "",
) -> LoadResult:
    """Map raw rows to examples (see the module docstring); rows with no final number are dropped."""
    cols = {**GSM8K_COLUMNS, **dict(columns or {})}
    allowed = {"question", "answer", "final", "category"}
    unknown = set(cols) - allowed
    if unknown:
        raise SourceError(f"unknown column mapping keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    if category_fallback not in ("steps", "magnitude") and not category_fallback.startswith("const:"):
        raise SourceError(f"unknown category_fallback {category_fallback!r}; allowed: {', '.join(CATEGORY_FALLBACKS)}")
    if rows:
        present = set(rows[0])
        missing = [f"{k} -> {v!r}" for k, v in cols.items() if v not in present]
        if missing:
            raise SourceError(
                f"{origin or 'source'}: columns not found: {', '.join(missing)}; the rows have "
                f"{sorted(present)}. Set the column mapping, e.g. columns: {{question: query, answer: response}}"
            )
    out: list[Example] = []
    dropped = 0
    for row in rows:
        question = str(row[cols["question"]]).strip()
        answer = str(row[cols["answer"]]).strip()
        final = normalize_number(str(row[cols["final"]])) if "final" in cols else final_from_answer(answer)
        if not question or final is None:
            dropped += 1
            continue
        if "category" in cols and row[cols["category"]] not in (None, ""):
            category = str(row[cols["category"]])
        else:
            category = fallback_category(answer, final, category_fallback)
        ex: Example = {"question": question, "answer": answer, "final": final, "category": category}
        for k in keep:
            if k in row:
                ex[k] = row[k]
        out.append(ex)
    return LoadResult(out, dropped, origin)


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


def load_local(
    path: str | os.PathLike[str],
    *,
    split: str = "train",
    columns: Mapping[str, str] | None = None,
    category_fallback: str = "steps",
    keep: Sequence[str] = (),
) -> LoadResult:
    """Examples from a data file, or from the ``split`` files of a folder."""
    p = Path(path)
    if p.is_dir():
        files = split_files(p, split)
        if not files:
            raise SourceError(f"{p}: no {split!r} data files (names starting with {split!r}, types {FILE_SUFFIXES})")
    elif p.is_file():
        files = [p]
    else:
        raise SourceError(f"data file not found: {p}")
    rows: list[dict[str, Any]] = []
    for f in files:
        rows.extend(read_records(f))
    origin = str(p) if p.is_file() else f"{p} [{split}]"
    return normalize_rows(rows, columns, category_fallback=category_fallback, keep=keep, origin=origin)


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


def load_hub(
    dataset_id: str,
    *,
    split: str = "train",
    config: str | None = None,
    columns: Mapping[str, str] | None = None,
    category_fallback: str = "steps",
    keep: Sequence[str] = (),
) -> LoadResult:
    """Examples of a hub dataset split via ``datasets.load_dataset`` (cached copies work offline)."""
    config = config or HUB_DEFAULT_CONFIGS.get(dataset_id)
    what = f"{dataset_id}" + (f" (config {config!r})" if config else "") + f", split {split!r}"
    hint = (
        f"Download it on a machine with hub access, e.g. "
        f"datasets.load_dataset({dataset_id!r}{', ' + repr(config) if config else ''}, split={split!r})"
        f".to_json('{split}.jsonl'), and pass the local file instead (source: /path/to/{split}.jsonl, "
        f"or a folder with train.jsonl and test.jsonl)."
    )
    try:
        import datasets
    except ImportError as exc:
        raise SourceError(f"cannot load the hub dataset {what}: the 'datasets' package is missing. {hint}") from exc
    try:
        ds = datasets.load_dataset(dataset_id, config, split=split)
    except Exception as exc:
        if _offline():
            reason = "the hub is unreachable in offline mode (HF_HUB_OFFLINE=1) and no cached copy exists"
        else:
            reason = "it could not be downloaded (no network access, a wrong id, or a missing config/split)"
        raise SourceError(
            f"cannot load the hub dataset {what}: {reason} [{type(exc).__name__}: {str(exc)[:300]}]. {hint}"
        ) from exc
    rows = ds.to_list()
    return normalize_rows(rows, columns, category_fallback=category_fallback, keep=keep, origin=f"hub:{what}")


# ---- dispatch ----------------------------------------------------------------------------------
def is_local(source: str) -> bool:
    """Whether ``source`` names a local file or folder (a known file suffix, or an existing path)."""
    p = Path(source).expanduser()
    return p.exists() or _suffix(p) in FILE_SUFFIXES or source.startswith((".", "/", "~"))


def load_source(
    source: str,
    *,
    split: str = "train",
    config: str | None = None,
    columns: Mapping[str, str] | None = None,
    category_fallback: str = "steps",
    keep: Sequence[str] = (),
) -> LoadResult:
    """Examples of ``split`` from a local file/folder or a hub dataset id (see the module docstring).

    A single file has no splits: it is read whole whatever ``split`` says.
    """
    if is_local(source):
        return load_local(
            Path(source).expanduser(), split=split, columns=columns, category_fallback=category_fallback, keep=keep
        )
    return load_hub(source, split=split, config=config, columns=columns, category_fallback=category_fallback, keep=keep)


def subsample(examples: Sequence[Example], n: int, seed: int | str) -> list[Example]:
    """A seeded subset of ``n`` examples in their original order (all of them when ``n <= 0``)."""
    if n <= 0 or n >= len(examples):
        return list(examples)
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep]


def split_before_partition(
    examples: Sequence[Example], n_test: int, seed: int | str
) -> tuple[list[Example], list[Example]]:
    """Hold out ``n_test`` examples (seeded) as the test set before any client partition.

    Returns ``(train, test)`` in source order: ``test`` is a seeded sample of ``n_test`` rows and
    ``train`` the remaining rows, less any whose question also occurs in ``test`` (duplicates in
    the source), so that no test question is trained on.
    """
    if not 0 <= n_test < len(examples):
        raise SourceError(f"cannot hold out {n_test} test examples from {len(examples)}")
    test_idx = set(random.Random(seed).sample(range(len(examples)), n_test))
    test = [examples[i] for i in sorted(test_idx)]
    test_questions = {ex["question"] for ex in test}
    train = [ex for i, ex in enumerate(examples) if i not in test_idx and ex["question"] not in test_questions]
    return train, test


__all__ = [
    "CATEGORY_FALLBACKS",
    "FILE_SUFFIXES",
    "GSM8K_COLUMNS",
    "LoadResult",
    "SourceError",
    "fallback_category",
    "final_from_answer",
    "is_local",
    "load_hub",
    "load_local",
    "load_source",
    "magnitude_bucket",
    "normalize_rows",
    "read_records",
    "solution_steps",
    "split_before_partition",
    "split_files",
    "step_bucket",
    "subsample",
]
