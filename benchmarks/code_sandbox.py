"""Score fixed completions with the code task's sandbox: HumanEval's 164 reference solutions and
a set of hostile wrong answers (issue #17), through ``CodeTask.score`` (the same call in the old
single-program sandbox and in the trusted-runner design, so both can be measured).

    PYTHONPATH=src python benchmarks/code_sandbox.py [--workers 2] [--out results.json] [--texts gen.json]

Prints pass@1, the statuses, and the wall time per problem. ``--texts``: also score generated
texts (a JSON file ``{"task_ids": [...], "texts": [[sample, ...], ...]}``, e.g. a model's greedy
outputs from ``CodeTask.generate``).
"""

from __future__ import annotations

import argparse
import json
import time

from fedlora.tasks.code.task import CodeSettings, CodeTask, load_eval_problems

# wrong answers to HumanEval/0 (has_close_elements) that try to pass anyway (function bodies)
HOSTILE = {
    "real_exit": "    import sys\n    sys.modules['__main__']._real_exit(0)\n",
    "real_exit_thread": (
        "    import sys, threading, time\n"
        "    threading.Thread(target=lambda: sys.modules['__main__']._real_exit(0)).start()\n"
        "    time.sleep(1)\n    return None\n"
    ),
    "posix_reimport_exit": "    import sys\n    sys.modules.pop('posix')\n    import posix\n    posix._exit(0)\n",
    "ctypes_exit": (
        "    import sys\n    sys.modules.pop('ctypes', None)\n    sys.modules.pop('_ctypes', None)\n"
        "    import ctypes\n    ctypes.CDLL(None)._exit(0)\n"
    ),
    "execv_true": (
        "    import sys\n    sys.modules.pop('posix')\n    import posix\n    posix.execv('/bin/true', ['true'])\n"
    ),
    "always_equal": (
        "    class Yes:\n        def __eq__(self, other):\n            return True\n"
        "        def __bool__(self):\n            return True\n    return Yes()\n"
    ),
    "prints_passed": "    print('passed')\n    return None\n",
    "raises_assertion": "    raise AssertionError('passed')\n",
}


def score_texts(task: CodeTask, problems: list[dict], path: str) -> dict:
    """pass@1, statuses and wall time of generated texts for the problems they name."""
    with open(path, encoding="utf-8") as fh:
        gen = json.load(fh)
    by_id = {p["task_id"]: p for p in problems}
    chosen = [by_id[t] for t in gen["task_ids"]]
    t0 = time.perf_counter()
    metrics = task.score(chosen, gen["texts"])
    wall = time.perf_counter() - t0
    keep = ("pass@1", "n", "n_passed", "n_failed", "n_error", "n_timeout", "n_killed")
    return {
        **{k: metrics[k] for k in keep},
        "statuses": {r["task_id"]: r["statuses"] for r in task.last_predictions},
        "wall_s": round(wall, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="")
    ap.add_argument("--texts", default="", help="generated texts to score as well (JSON)")
    args = ap.parse_args()
    problems = load_eval_problems("humaneval")
    task = CodeTask(CodeSettings(n_eval=0, workers=args.workers))
    t0 = time.perf_counter()
    ref = task.score(problems, [[p["canonical_solution"]] for p in problems])
    wall = time.perf_counter() - t0
    failing = [r["task_id"] for r in task.last_predictions if not r["passed"]]
    hostile = {}
    for name, body in HOSTILE.items():
        task.score(problems[:1], [[body]])
        rec = task.last_predictions[0]
        hostile[name] = {"status": rec["statuses"][0], "detail": rec["details"][0][:160]}
    report = {
        "reference": {k: ref[k] for k in ("pass@1", "n", "n_passed", "n_failed", "n_error", "n_timeout", "n_killed")},
        "reference_not_passing": failing,
        "reference_wall_s": round(wall, 2),
        "reference_wall_s_per_problem": round(wall / len(problems), 4),
        "workers": args.workers,
        "hostile": hostile,
        "hostile_passing": sorted(n for n, h in hostile.items() if h["status"] == "passed"),
    }
    if args.texts:
        report["generated"] = score_texts(task, problems, args.texts)
    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
