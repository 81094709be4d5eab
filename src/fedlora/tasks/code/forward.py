"""Forwarded calls: plain values over a pipe, and the trusted runner that checks a candidate it
never executes.

The test of a problem (``check(candidate)``) runs in a *trusted runner* process; the generated
code runs in a separate sandboxed process (:mod:`fedlora.tasks.code.sandbox`). In the runner,
``candidate`` (and the entry point's name) is a proxy: each call's arguments are encoded as plain
values and written as one line to the request pipe; the sandboxed process calls the entry point
and writes one line back: the result as plain values, or the type and message of the exception it
raised. The runner parses replies with :func:`ast.literal_eval` (never ``pickle``, never
``eval``) and decodes them strictly (:func:`decode`); whatever does not decode is a protocol
violation. The verdict is the runner's alone: ``"passed"`` only when ``check`` returned normally
and no protocol violation happened. Nothing the sandboxed process does (its exit status, its
output, what it writes to the pipe) can make a wrong answer pass.

Plain values (:func:`encode` / :func:`decode`): ``None``, ``bool``, ``int``, ``float`` (nan,
±inf and -0.0 included), ``complex``, ``str``, ``bytes``, ``list``, ``tuple``, ``dict``, ``set``,
``frozenset``, nested up to :data:`MAX_DEPTH` levels; exact types only (a subclass of ``int`` or
``str`` is not plain, so a rigged ``__eq__`` never reaches the runner). ``None``, ``bool``,
``str``, ``bytes`` and 64-bit ``int`` travel as themselves; everything else as a tagged tuple:
``("int", hex)``, ``("float", float.hex())``, ``("complex", real.hex(), imag.hex())``,
``("list" | "tuple" | "set" | "frozenset", [items])``, ``("dict", [(key, value), ...])``.
Arguments are forwarded by value: a candidate that mutates its arguments mutates copies, which
the runner never sees (HumanEval's tests deep-copy their arguments where it matters).

Messages (one ``repr`` per line, at most :data:`MAX_LINE` bytes):

* runner -> sandbox: ``("call", [args], [(name, value), ...])``;
* sandbox -> runner: ``("ready",)`` once the program is loaded and the entry point is callable, or
  ``("setup", type, message)`` when loading failed; then, per call, ``("ok", value)``,
  ``("raise", type, message)`` (re-raised in the runner as :class:`CandidateError`, never as an
  ``AssertionError``) or ``("unplain", type)`` (the result is not a plain value).

This module is pure standard library with no import-time side effects: its source is also the
code of the trusted runner (``python -I -S -c <source> + "runner_main()"``) and is prepended to the
sandboxed process's bootstrap (which uses :func:`serve`).
"""

from __future__ import annotations

import ast
import json
import os
import sys
from collections.abc import Callable
from typing import Any, BinaryIO

MAX_LINE = 4 * 1024 * 1024  # bytes per message
MAX_DEPTH = 64  # nesting of a plain value
TEXT_KEEP = 300  # characters of an exception message kept
_SMALL_INT = 1 << 63
_SEQUENCES: dict[str, Callable[[list[Any]], Any]] = {
    "list": list,
    "tuple": tuple,
    "set": set,
    "frozenset": frozenset,
}


class NotPlain(TypeError):
    """A value that is not a plain value (see the module docstring)."""


class WireError(ValueError):
    """A message that is not a well-formed encoding."""


class CandidateError(Exception):
    """The candidate raised ``type_name: message`` in the sandboxed process (never an
    ``AssertionError`` in the runner, whatever the candidate raised)."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"the candidate raised {type_name}: {message}")
        self.type_name = type_name
        self.message = message


class ProtocolViolation(BaseException):
    """The sandboxed process broke the protocol (ended, garbage, a non-plain result). A
    ``BaseException`` so that a test's ``except Exception`` does not swallow it; the runner also
    records it, so the verdict is ``"error"`` even if the test catches everything."""


# ---- plain values ------------------------------------------------------------------------------
def encode(value: Any, depth: int = 0) -> Any:
    """The wire form of a plain value; :class:`NotPlain` for anything else."""
    if depth > MAX_DEPTH:
        raise NotPlain(f"nested deeper than {MAX_DEPTH} levels")
    kind = type(value)
    if value is None or kind is bool or kind is str or kind is bytes:
        return value
    if kind is int:
        return value if -_SMALL_INT <= value < _SMALL_INT else ("int", hex(value))
    if kind is float:
        return ("float", value.hex())
    if kind is complex:
        return ("complex", value.real.hex(), value.imag.hex())
    if kind in (list, tuple, set, frozenset):
        return (kind.__name__, [encode(item, depth + 1) for item in value])
    if kind is dict:
        return ("dict", [(encode(k, depth + 1), encode(v, depth + 1)) for k, v in value.items()])
    raise NotPlain(f"a {kind.__module__}.{kind.__qualname__} is not a plain value")


def decode(obj: Any, depth: int = 0) -> Any:
    """The value of a wire form (as :func:`ast.literal_eval` returns it); :class:`WireError` for
    anything that :func:`encode` cannot have produced."""
    if depth > MAX_DEPTH:
        raise WireError(f"nested deeper than {MAX_DEPTH} levels")
    kind = type(obj)
    if obj is None or kind is bool or kind is int or kind is str or kind is bytes:
        return obj
    if kind is not tuple or not obj or type(obj[0]) is not str:
        raise WireError(f"not an encoded value: {type(obj).__name__}")
    tag, rest = obj[0], obj[1:]
    try:
        if tag == "int" and len(rest) == 1 and type(rest[0]) is str:
            return int(rest[0], 16)
        if tag == "float" and len(rest) == 1 and type(rest[0]) is str:
            return float.fromhex(rest[0])
        if tag == "complex" and len(rest) == 2 and all(type(x) is str for x in rest):
            return complex(float.fromhex(rest[0]), float.fromhex(rest[1]))
        if tag in _SEQUENCES and len(rest) == 1 and type(rest[0]) is list:
            return _SEQUENCES[tag]([decode(item, depth + 1) for item in rest[0]])
        if tag == "dict" and len(rest) == 1 and type(rest[0]) is list:
            return dict(_decode_pair(pair, depth + 1) for pair in rest[0])
    except (ValueError, TypeError, OverflowError) as exc:  # bad hex, an unhashable set item or key
        raise WireError(f"bad {tag!r} value: {exc}") from None
    raise WireError(f"unknown or malformed tag {tag!r}")


def _decode_pair(pair: Any, depth: int) -> tuple[Any, Any]:
    if type(pair) is not tuple or len(pair) != 2:
        raise WireError("a dict item is not a (key, value) pair")
    return decode(pair[0], depth), decode(pair[1], depth)


def dumps(message: tuple[Any, ...]) -> bytes:
    """One message as one line (``repr`` escapes newlines inside strings)."""
    line = repr(message).encode("utf-8", "backslashreplace") + b"\n"
    if len(line) > MAX_LINE:
        raise NotPlain(f"message of {len(line)} bytes exceeds {MAX_LINE}")
    return line


def loads(line: bytes) -> Any:
    """The literal of one line (:func:`ast.literal_eval` only); :class:`WireError` otherwise."""
    if not line.endswith(b"\n"):
        raise WireError("truncated or overlong line" if line else "end of stream")
    try:
        return ast.literal_eval(line.decode("utf-8"))
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError, UnicodeDecodeError) as exc:
        raise WireError(f"not a literal: {type(exc).__name__}") from None


def _text(exc: BaseException) -> str:
    try:
        return str(exc)[:TEXT_KEEP]
    except BaseException:  # a hostile __str__
        return "<unprintable>"


# ---- the sandboxed side ----------------------------------------------------------------------------
def serve(fn: Callable[..., Any], requests: BinaryIO, replies: BinaryIO) -> None:
    """Answer call requests with ``fn`` until the runner closes the request pipe (runs in the
    sandboxed process, which the runner does not trust: this is a convenience, not a guarantee)."""
    while True:
        line = requests.readline(MAX_LINE + 1)
        if not line:
            return
        try:
            _, args, kwargs = loads(line)
            args = [decode(a) for a in args]
            kwargs = {k: decode(v) for k, v in kwargs}
        except (WireError, ValueError, TypeError) as exc:
            _send(replies, ("setup", "WireError", _text(exc)))
            return
        try:
            value = fn(*args, **kwargs)
        except BaseException as exc:
            reply: tuple[Any, ...] = ("raise", type(exc).__name__, _text(exc))
        else:
            try:
                reply = ("ok", encode(value))
                _send(replies, reply)
                continue
            except (NotPlain, RecursionError):
                reply = ("unplain", type(value).__qualname__)
        _send(replies, reply)


def _send(stream: BinaryIO, message: tuple[Any, ...]) -> None:
    stream.write(dumps(message))
    stream.flush()


# ---- the trusted runner ------------------------------------------------------------------------------
class Channel:
    """The runner's end of the pipes to the sandboxed process. The first protocol violation is
    kept in :attr:`violation` (the verdict is then ``"error"``) and every later call fails."""

    def __init__(self, requests: BinaryIO, replies: BinaryIO) -> None:
        self.requests = requests
        self.replies = replies
        self.violation: str | None = None
        self.ended = False  # the sandboxed process closed its end (exited, exec'd, was killed)
        self.calls = 0

    def fail(self, detail: str, ended: bool = False) -> ProtocolViolation:
        if self.violation is None:
            self.violation, self.ended = detail, ended
        return ProtocolViolation(self.violation)

    def receive(self) -> tuple[Any, ...]:
        """The next reply; a violation on end of stream, garbage or a reply that is not a tuple."""
        line = self.replies.readline(MAX_LINE + 1)
        if not line:
            raise self.fail("the sandboxed process ended without answering", ended=True)
        try:
            reply = loads(line)
        except WireError as exc:
            raise self.fail(f"garbage on the reply pipe ({exc})") from None
        if type(reply) is not tuple or not reply or type(reply[0]) is not str:
            raise self.fail("a malformed reply on the pipe")
        return reply

    def call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Forward one call; its decoded result, or :class:`CandidateError` / a violation."""
        if self.violation is not None:
            raise ProtocolViolation(self.violation)
        try:
            message = dumps(("call", [encode(a) for a in args], [(k, encode(v)) for k, v in kwargs.items()]))
        except NotPlain as exc:
            raise self.fail(f"the test passed an argument that cannot be forwarded ({exc})") from None
        try:
            self.requests.write(message)
            self.requests.flush()
        except OSError:
            raise self.fail("the sandboxed process ended before a call", ended=True) from None
        self.calls += 1
        reply = self.receive()
        if reply[0] == "ok" and len(reply) == 2:
            try:
                return decode(reply[1])
            except WireError as exc:
                raise self.fail(f"the reply is not a plain value ({exc})") from None
        if reply[0] == "raise" and len(reply) == 3 and all(type(x) is str for x in reply[1:]):
            raise CandidateError(reply[1], reply[2])
        if reply[0] == "unplain" and len(reply) == 2 and type(reply[1]) is str:
            raise self.fail(f"the candidate returned a {reply[1][:80]}, not a plain value")
        raise self.fail(f"an unexpected reply {str(reply[0])[:40]!r}")


def make_proxy(channel: Channel, name: str) -> Callable[..., Any]:
    """The ``candidate`` the test calls: every call goes through ``channel``."""

    def candidate(*args: Any, **kwargs: Any) -> Any:
        return channel.call(args, kwargs)

    candidate.__name__ = candidate.__qualname__ = name
    return candidate


def _exec_prompt(prompt: str, scope: dict[str, Any]) -> None:
    """The dataset's prompt (trusted): its imports and helpers, the entry point as a stub."""
    try:
        code = compile(prompt, "<prompt>", "exec")
    except SyntaxError:  # a prompt that ends in a bare signature
        code = compile(prompt + "    pass\n", "<prompt>", "exec")
    exec(code, scope)


def _candidate_verdict(exc: CandidateError) -> dict[str, str]:
    if exc.type_name == "MemoryError":
        return {"status": "killed", "detail": f"memory limit (MemoryError in the candidate) {exc.message}".strip()}
    if exc.type_name == "OSError" and exc.message.startswith("[Errno 27]"):
        return {"status": "killed", "detail": f"file size limit (EFBIG) {exc.message}"}
    return {"status": "error", "detail": str(exc)}


def check_candidate(prompt: str, test: str, entry_point: str, channel: Channel) -> dict[str, Any]:
    """Run the dataset's ``check(candidate)`` against the forwarded entry point; the verdict
    ``{"status", "detail", "calls", "ended"}`` (see the module docstring)."""
    try:
        ready = channel.receive()
    except ProtocolViolation:
        ready = ("",)
    if channel.violation is None and ready[0] == "setup" and len(ready) == 3:
        kind, message = str(ready[1])[:80], str(ready[2])[:TEXT_KEEP]
        status = "killed" if kind == "MemoryError" else "error"
        return {"status": status, "detail": f"the program did not load: {kind}: {message}", "calls": 0, "ended": False}
    if channel.violation is None and ready != ("ready",):
        channel.fail("no ready message from the sandboxed process")
    verdict = {"status": "passed", "detail": ""}
    if channel.violation is None:
        verdict = _run_check(prompt, test, entry_point, channel)
    if channel.violation is not None:  # whatever the test did with it
        verdict = {"status": "error", "detail": channel.violation}
    return {**verdict, "calls": channel.calls, "ended": channel.ended}


def _run_check(prompt: str, test: str, entry_point: str, channel: Channel) -> dict[str, str]:
    scope: dict[str, Any] = {"__name__": "__check__"}
    try:
        _exec_prompt(prompt, scope)
        exec(compile(test, "<test>", "exec"), scope)
        check = scope["check"]
    except BaseException as exc:
        return {"status": "error", "detail": f"runner: the problem's prompt or test did not load: {exc!r}"}
    proxy = make_proxy(channel, entry_point)
    scope[entry_point] = proxy  # MBPP tests call the function by its name
    try:
        check(proxy)
    except ProtocolViolation:
        pass  # recorded in the channel
    except AssertionError as exc:
        return {"status": "failed", "detail": f"AssertionError: {_text(exc)}".rstrip(": ")}
    except CandidateError as exc:
        return _candidate_verdict(exc)
    except BaseException as exc:
        return {"status": "error", "detail": f"{type(exc).__name__}: {_text(exc)}"}
    return {"status": "passed", "detail": ""}


def runner_main() -> None:
    """The trusted runner process: ``argv[1:] = [request_fd, reply_fd]``; stdin: the JSON job
    ``{prompt, test, entry_point, nonce}``; stdout: one JSON verdict line carrying the nonce (the
    test's own prints go to stderr)."""
    requests = os.fdopen(int(sys.argv[1]), "wb")
    replies = os.fdopen(int(sys.argv[2]), "rb")
    job = json.loads(sys.stdin.read())
    verdict_out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # print() in the test goes to stderr; stdout is for the verdict only
    verdict = check_candidate(job["prompt"], job["test"], job["entry_point"], Channel(requests, replies))
    verdict_out.write(json.dumps({**verdict, "nonce": job["nonce"]}) + "\n")
    verdict_out.flush()
    sys.stdout.flush()
    os._exit(0)  # skip closing the pipes' buffered writers at interpreter exit
