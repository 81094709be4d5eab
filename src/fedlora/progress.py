"""Progress for long work: a live bar in a terminal, periodic plain lines everywhere else.

:class:`Progress` is what the runtimes show for local training, evaluation and set-up. In a
terminal that reports a width it is a ``tqdm`` bar; where the output is a file, a pipe, a CI log
or a pseudo-terminal with no size (where a bar prints nothing useful, or nothing at all) it writes
one plain line at most every ``interval`` seconds, and one when it ends, so a log shows what is
happening and how fast.

Long inner loops that know nothing of the runtime (a task's batched generation, its scoring
passes) report through :func:`expect` and :func:`advance`; they are no-ops unless a caller has
opened :func:`tracking` around them. This module imports nothing from fedlora (lowest layer).
"""

from __future__ import annotations

import contextvars
import os
import sys
import time
from contextlib import contextmanager
from typing import IO, Any, Iterator

LINE_INTERVAL = 30.0
"""Seconds between two plain progress lines (non-terminal output)."""


def terminal_width(stream: IO[str]) -> int:
    """The width of the terminal behind ``stream``; 0 when it is not a terminal or has no size."""
    try:
        if not stream.isatty():
            return 0
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """A counter of ``unit``s towards ``total`` (``None``: unknown), shown as a bar or as lines.

    ``mode``: ``"auto"`` (a bar where ``stream`` is a terminal with a width, else lines),
    ``"bar"``, ``"lines"`` or ``"off"``.
    """

    def __init__(
        self,
        total: int | None = None,
        *,
        desc: str = "",
        unit: str = "it",
        initial: int = 0,
        mode: str = "auto",
        stream: IO[str] | None = None,
        interval: float = LINE_INTERVAL,
        leave: bool = True,
        position: int | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "bar" if terminal_width(self.stream) > 0 else "lines"
        if mode not in ("bar", "lines", "off"):
            raise ValueError(f"progress mode must be auto, bar, lines or off, got {mode!r}")
        self.mode = mode
        self.total, self.n, self.desc, self.unit = total, initial, desc, unit
        self.postfix: dict[str, Any] = {}
        self.interval = interval
        self._start_n = self._written_n = initial
        self._t0 = self._last = time.monotonic()
        self._bar = None
        if mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit=unit,
                file=self.stream,
                dynamic_ncols=True,
                leave=leave,
                position=position,
            )

    # ---- updates ------------------------------------------------------------------------------
    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "lines" and time.monotonic() - self._last >= self.interval:
            self._write_line()

    def add_total(self, n: int) -> None:
        """Grow the total by ``n`` (work announced as it starts)."""
        self.total = (self.total or 0) + n
        if self._bar is not None:
            self._bar.total = self.total
            self._bar.refresh()

    def set_description(self, desc: str) -> None:
        self.desc = desc
        if self._bar is not None:
            self._bar.set_description(desc)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values
        if self._bar is not None:
            self._bar.set_postfix(**values)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == "lines" and self.n > self._written_n:
            self._write_line(done=True)
        self.mode = "off"

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- plain lines --------------------------------------------------------------------------
    def line(self, *, done: bool = False) -> str:
        """The plain line for the current state (what ``lines`` mode writes)."""
        elapsed = time.monotonic() - self._t0
        count = f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"
        parts = [f"{self.desc}: {count}" if self.desc else count]
        if self.total and not done:
            parts.append(f"{100.0 * self.n / self.total:.0f}%")
        done_here = self.n - self._start_n
        if done_here > 0 and elapsed > 0:
            per = elapsed / done_here
            parts.append(f"{per:.2f} s/{self.unit}" if per >= 1 else f"{1 / per:.1f} {self.unit}/s")
            if self.total and not done and self.n < self.total:
                parts.append(f"eta {_duration(per * (self.total - self.n))}")
        parts.append(f"{'took' if done else 'elapsed'} {_duration(elapsed)}")
        parts.extend(f"{k}={v}" for k, v in self.postfix.items())
        return ", ".join(parts)

    def _write_line(self, done: bool = False) -> None:
        self._last, self._written_n = time.monotonic(), self.n
        self.stream.write(time.strftime("%H:%M:%S ") + self.line(done=done) + "\n")
        self.stream.flush()


def quiet_library_bars() -> None:
    """Turn off transformers' and huggingface_hub's own progress bars (weight loading, GGUF
    dequantizing), which redraw with carriage returns: right in a terminal, noise in a log."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass


# ---- progress of inner loops that do not know who is watching -----------------------------------
_current: contextvars.ContextVar[Progress | None] = contextvars.ContextVar("fedlora_progress", default=None)


@contextmanager
def tracking(progress: Progress) -> Iterator[Progress]:
    """Route :func:`expect` / :func:`advance` calls inside the block to ``progress``; closes it."""
    token = _current.set(progress)
    try:
        yield progress
    finally:
        _current.reset(token)
        progress.close()


def expect(n: int) -> None:
    """A loop of ``n`` units starts (adds to the tracked total); no-op when nothing is tracked."""
    progress = _current.get()
    if progress is not None:
        progress.add_total(n)


def advance(n: int = 1) -> None:
    """``n`` units are done; no-op when nothing is tracked."""
    progress = _current.get()
    if progress is not None:
        progress.update(n)


__all__ = ["LINE_INTERVAL", "Progress", "advance", "expect", "quiet_library_bars", "terminal_width", "tracking"]
