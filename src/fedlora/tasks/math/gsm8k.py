"""GSM8K-format math examples (GSM8K, MetaMathQA, ...) from local files or the hub, in the generator's format.

Protocol
--------
Every loader returns examples as dicts ``{"question", "answer", "final", "category"}`` (plus
any extra columns named in ``keep``), exactly like :func:`fedlora.tasks.math.generator.generate_math`:

* ``question`` / ``answer``: read through a column mapping (default GSM8K's own names,
  ``{"question": "question", "answer": "answer"}``; e.g. MetaMathQA needs
  ``{"question": "query", "answer": "response"}``).
* ``final``: the mapped ``final`` column if there is one, else the number after the answer's
  ``####`` line (GSM8K), else :func:`~fedlora.tasks.math.numbers.extract_final_number` of the answer;
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

Sources (:func:`load_source`), read by the general row layer :mod:`fedlora.data.sources`: a file
(``.jsonl``, ``.json``, ``.csv``, ``.parquet``; ``.jsonl.gz`` / ``.json.gz`` too), a folder holding
``<split>*.{jsonl,json,csv,parquet}`` files (e.g. a clone of a hub dataset repository), or a hub
dataset id (``openai/gsm8k``, config ``main``), read with ``datasets.load_dataset`` only when the
machine can reach the hub or has the dataset cached. Offline (``HF_HUB_OFFLINE=1``) or without
network, a hub id fails with a :class:`~fedlora.data.sources.SourceError` naming the dataset and
how to use a local file instead.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.data.sources import FILE_SUFFIXES, SourceError, holdout, hub_rows, is_local, read_records, split_files
from fedlora.tasks.math.numbers import extract_final_number, normalize_number

Example = dict[str, Any]

GSM8K_COLUMNS: dict[str, str] = {"question": "question", "answer": "answer"}
CATEGORY_FALLBACKS = ("steps", "magnitude", "const:NAME")
# hub ids whose config must be named (load_dataset fails without one)
HUB_DEFAULT_CONFIGS: dict[str, str] = {"openai/gsm8k": "main", "gsm8k": "main"}


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


# ---- sources -----------------------------------------------------------------------------------
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
    local_hint = (
        f"pass the local file instead (source: /path/to/{split}.jsonl, or a folder with train.jsonl and test.jsonl)."
    )
    rows = hub_rows(dataset_id, split, config, local_hint=local_hint)
    return normalize_rows(rows, columns, category_fallback=category_fallback, keep=keep, origin=f"hub:{what}")


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


def split_before_partition(
    examples: Sequence[Example], n_test: int, seed: int | str
) -> tuple[list[Example], list[Example]]:
    """Hold out ``n_test`` examples (seeded) as the test set before any client partition.

    Returns ``(train, test)`` in source order: ``test`` is a seeded sample of ``n_test`` rows and
    ``train`` the remaining rows, less any whose question also occurs in ``test`` (duplicates in
    the source), so that no test question is trained on (:func:`~fedlora.data.sources.holdout`
    keyed by the question; ``n_test = 0`` holds out nothing).
    """
    if not 0 <= n_test < len(examples):
        raise SourceError(f"cannot hold out {n_test} test examples from {len(examples)}")
    if n_test == 0:
        return list(examples), []
    return holdout(examples, n_test, seed, _question)


def _question(ex: Example) -> str:
    return ex["question"]


__all__ = [
    "CATEGORY_FALLBACKS",
    "GSM8K_COLUMNS",
    "HUB_DEFAULT_CONFIGS",
    "LoadResult",
    "fallback_category",
    "final_from_answer",
    "load_hub",
    "load_local",
    "load_source",
    "magnitude_bucket",
    "normalize_rows",
    "solution_steps",
    "split_before_partition",
    "step_bucket",
]
