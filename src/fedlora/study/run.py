"""Running a study: every cell as a normal run, in one process, one after another, resumable.

A cell whose folder holds a finished run (``summary.json`` with all rounds) made with the same
config is skipped; one with a checkpoint but no summary (killed mid-run) is resumed; one whose
saved config differs from the spec's is started again (the spec changed). A cell that raises is
reported (``study_error.txt`` in its folder, with the traceback) and the study goes on.
"""

from __future__ import annotations

import gc
import logging
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from fedlora import atomic
from fedlora.engine.config import config_from_dict
from fedlora.study.spec import Cell, StudySpec

log = logging.getLogger("fedlora.study")
ERROR_FILE = "study_error.txt"


@dataclass
class CellOutcome:
    """What happened to one cell: ``ran``, ``resumed``, ``skipped`` (already finished) or ``failed``."""

    cell: Cell
    status: str
    seconds: float = 0.0
    error: str | None = None


def saved_config(run_dir: Path) -> dict[str, Any] | None:
    try:
        data = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def cell_state(cell: Cell) -> str:
    """``finished`` (same config, all rounds done), ``partial`` (same config, checkpoint, no summary),
    ``stale`` (a run with another config is there) or ``new``."""
    run_dir = cell.run_dir
    saved = saved_config(run_dir)
    if saved is None:
        return "new"
    try:  # through the schema: keys added to it since the run get their defaults, not "stale"
        same = config_from_dict(saved).to_dict() == cell.config.to_dict()
    except ValueError:
        same = False
    if not same:
        return "stale"
    summary = run_dir / "summary.json"
    if summary.is_file():
        import json

        try:
            rounds = json.loads(summary.read_text()).get("rounds")
        except (OSError, ValueError):
            rounds = None
        if rounds == cell.config.rounds.num_rounds:
            return "finished"
    return "partial" if (run_dir / "checkpoint").is_dir() else "new"


def run_cell(cell: Cell, *, progress: bool = False) -> str:
    """Run (or resume) one cell; returns ``ran`` or ``resumed``. Exceptions propagate."""
    from fedlora.engine.local import run_experiment

    state = cell_state(cell)
    resume = state == "partial"
    run_dir = cell.run_dir
    (run_dir / ERROR_FILE).unlink(missing_ok=True)
    if not resume and (run_dir / "summary.json").exists():
        (run_dir / "summary.json").unlink()  # a stale run: its summary must not outlive it
    try:
        run_experiment(cell.config, resume=resume, progress=progress)
    finally:
        gc.collect()
    return "resumed" if resume else "ran"


def run_study(
    spec: StudySpec,
    extra: Mapping[str, Any] | None = None,
    *,
    progress: bool = False,
    echo: Callable[[str], None] = print,
    only: Callable[[Cell], bool] | None = None,
) -> list[CellOutcome]:
    """Run every cell of ``spec`` (sequentially), skipping finished ones; never stops on a failing cell."""
    cells = [c for c in spec.cells(extra) if only is None or only(c)]
    outcomes: list[CellOutcome] = []
    n = len(cells)
    t_study = time.perf_counter()
    ran_seconds: list[float] = []
    for i, cell in enumerate(cells, start=1):
        head = f"[study {spec.name}] cell {i}/{n} {cell.name}"
        if cell_state(cell) == "finished":
            echo(f"{head}: finished before, skipped")
            outcomes.append(CellOutcome(cell, "skipped"))
            continue
        echo(f"{head}: running ({cell.method}, seed {cell.seed})")
        t = time.perf_counter()
        try:
            status = run_cell(cell, progress=progress)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # one crashed cell must not stop the study
            secs = time.perf_counter() - t
            text = "".join(traceback.format_exception(exc))
            cell.run_dir.mkdir(parents=True, exist_ok=True)
            atomic.write_text(cell.run_dir / ERROR_FILE, text)
            why = f"{type(exc).__name__}: {exc}"
            echo(f"{head}: FAILED after {secs:.0f} s: {why} (see {cell.run_dir / ERROR_FILE})")
            outcomes.append(CellOutcome(cell, "failed", secs, f"{type(exc).__name__}: {exc}"))
            continue
        secs = time.perf_counter() - t
        ran_seconds.append(secs)
        left = sum(1 for c in cells[i:] if cell_state(c) != "finished")
        eta = left * sum(ran_seconds) / len(ran_seconds)
        echo(
            f"{head}: {status} in {secs:.0f} s (study {time.perf_counter() - t_study:.0f} s, ~{eta / 60:.0f} min left)"
        )
        outcomes.append(CellOutcome(cell, status, secs))
    failed = [o for o in outcomes if o.status == "failed"]
    echo(
        f"[study {spec.name}] done: {sum(o.status in ('ran', 'resumed') for o in outcomes)} run, "
        f"{sum(o.status == 'skipped' for o in outcomes)} skipped, {len(failed)} failed"
        + (f" ({', '.join(o.cell.name for o in failed)})" if failed else "")
    )
    return outcomes


__all__ = ["CellOutcome", "cell_state", "run_cell", "run_study"]
