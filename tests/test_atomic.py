"""fedlora.atomic: the one write recipe every record uses (temp + fsync + rename + fsync of the folder)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fedlora import atomic
from fedlora.atomic import _umask


def test_write_replaces_whole_keeps_the_mode_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    atomic.write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()  # not mkstemp's private 0600
    os.chmod(target, 0o600)
    atomic.write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2} and target.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_failed_write_keeps_the_old_content_and_removes_its_temporary(tmp_path):
    target = tmp_path / "config.yaml"
    atomic.write_text(target, "old\n")
    with pytest.raises(RuntimeError), atomic.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old\n"
    assert atomic.stale_temporaries(target) == []


def test_temporaries_of_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "metrics.jsonl"
    (tmp_path / ".metrics.jsonl.tmp-dead1").write_text("partial")
    (tmp_path / ".metrics.jsonl.tmp-dead2").mkdir()
    assert len(atomic.stale_temporaries(target)) == 2
    atomic.write_text(target, "x\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_a_symlink_target_is_refused_before_anything_is_written(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    with pytest.raises(OSError, match="symbolic link"):
        atomic.write_json(link, {"x": 1})
    with pytest.raises(OSError, match="symbolic link"), atomic.atomic_folder(link):
        pass
    assert real.read_text() == "{}" and link.is_symlink()


def test_folders_swap_whole_and_a_failed_fill_keeps_the_old_one(tmp_path):
    target = tmp_path / "final"
    with atomic.atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("1")
    with atomic.atomic_folder(target) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert target.stat().st_mode & 0o777 == 0o777 & ~_umask()  # not mkdtemp's private 0700
    with pytest.raises(KeyboardInterrupt), atomic.atomic_folder(target) as tmp:
        (tmp / "c.txt").write_text("3")
        raise KeyboardInterrupt
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_recover_folder_brings_back_the_previous_version_after_a_kill_between_renames(tmp_path):
    target, old = tmp_path / "checkpoint", tmp_path / ".checkpoint.old"
    old.mkdir()
    (old / "state.json").write_text("{}")
    assert atomic.recover_folder(target, complete="state.json") == target  # moved back into place
    assert (target / "state.json").is_file() and not old.exists()
    old.mkdir()  # a finished target makes a leftover .old stale
    assert atomic.recover_folder(target, complete="state.json") == target and not old.exists()


def test_append_line_never_loses_an_earlier_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    for i in range(3):
        atomic.append_line(log, json.dumps({"round": i}))
    assert [json.loads(x)["round"] for x in log.read_text().splitlines()] == [0, 1, 2]


WRITER = """
import json, sys
from fedlora import atomic
target = sys.argv[1]
i = 0
while True:
    i += 1
    atomic.write_json(target, {"i": i, "pad": "x" * 200000})
"""


def test_a_writer_killed_at_random_moments_always_leaves_a_whole_file(tmp_path):
    target = tmp_path / "summary.json"
    atomic.write_json(target, {"i": 0, "pad": ""})
    seen = set()
    for delay in (0.05, 0.11, 0.17, 0.23, 0.31):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)])
        time.sleep(delay + 0.5)  # interpreter start-up, then some writes
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        seen.add(json.loads(target.read_text())["i"])  # never a torn file
    assert max(seen) > 0  # the writer did replace the file
    atomic.write_json(target, {"i": -1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # leftovers cleaned by the next write


def test_save_figure_writes_a_png_atomically(tmp_path):
    from matplotlib.figure import Figure

    fig = Figure()
    fig.add_subplot(1, 1, 1).plot([0, 1], [1, 0])
    out = atomic.save_figure(tmp_path / "curves.png", fig, dpi=20)
    assert out.read_bytes().startswith(b"\x89PNG")
    assert atomic.stale_temporaries(out) == []
