"""Atomic checkpoints leave no temporary folder behind: not after a save, nor after a save killed
midway once the next save or load has run (issue #21)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from fedlora.atomic import stale_temporaries
from fedlora.engine.checkpoint import load_checkpoint, save_checkpoint


def _leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith(".checkpoint"))


def _state(v: float) -> dict:
    return {"round": int(v), "factors": {"m": {"A": torch.full((2, 3), v), "B": torch.zeros(4, 2)}}, "note": None}


def test_save_leaves_only_the_checkpoint(tmp_path):
    for v in (1.0, 2.0, 3.0):
        save_checkpoint(tmp_path / "checkpoint", _state(v))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    back = load_checkpoint(tmp_path / "checkpoint")
    assert back["round"] == 3 and torch.equal(back["factors"]["m"]["A"], torch.full((2, 3), 3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def _killed_save(folder: Path) -> None:
    """A process SIGKILLed while writing ``folder``'s next checkpoint (after its temporary folder exists)."""
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        import fedlora.engine.checkpoint as ck
        ck.save_file = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        ck.save_checkpoint({str(folder)!r}, {{"round": 9, "t": torch.ones(2)}})
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr[-2000:]


def test_a_killed_save_leaves_a_folder_that_the_next_load_removes(tmp_path):
    save_checkpoint(tmp_path / "checkpoint", _state(1.0))
    _killed_save(tmp_path / "checkpoint")
    assert len(_leftovers(tmp_path)) == 1 and stale_temporaries(tmp_path / "checkpoint")
    assert load_checkpoint(tmp_path / "checkpoint")["round"] == 1  # the last whole checkpoint
    assert _leftovers(tmp_path) == []


def test_a_killed_save_leaves_a_folder_that_the_next_save_removes(tmp_path):
    save_checkpoint(tmp_path / "checkpoint", _state(1.0))
    _killed_save(tmp_path / "checkpoint")
    (tmp_path / ".checkpoint.k3x9_q2w").mkdir()  # the name an older fedlora's killed save left
    save_checkpoint(tmp_path / "checkpoint", _state(2.0))
    assert _leftovers(tmp_path) == []
    assert load_checkpoint(tmp_path / "checkpoint")["round"] == 2


def test_a_crash_between_the_renames_restores_the_previous_checkpoint(tmp_path):
    """Killed after ``checkpoint`` -> ``.checkpoint.old`` but before the new one was renamed in."""
    save_checkpoint(tmp_path / "checkpoint", _state(1.0))
    os.replace(tmp_path / "checkpoint", tmp_path / ".checkpoint.old")
    save_checkpoint(tmp_path / "other", _state(2.0))  # stands for the complete new temporary folder
    os.replace(tmp_path / "other", tmp_path / ".checkpoint.tmp-abc")
    assert load_checkpoint(tmp_path / "checkpoint")["round"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert load_checkpoint(tmp_path / "checkpoint")["round"] == 1


def test_other_folders_are_left_alone(tmp_path):
    for name in ("final", ".final.abc", "checkpoints", ".checkpointing"):
        (tmp_path / name).mkdir()
    save_checkpoint(tmp_path / "checkpoint", _state(1.0))
    load_checkpoint(tmp_path / "checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".checkpointing",
        ".final.abc",
        "checkpoint",
        "checkpoints",
        "final",
    ]
