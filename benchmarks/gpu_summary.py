"""The markdown summary of one ``benchmarks/gpu.sh OUT_DIR`` run (printed; gpu.sh writes it to
``OUT_DIR/summary.md``): the machine, the CUDA-only tests, aggregation, rounds, memory, the side
path, padding-free batches, DP-SGD, the momentum diagnostics and clients in parallel."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

TARGET_7B_NF4_BYTES = 10e9  # issue #15: 7B nf4, r=16 all linear, seq 512, batch 4, checkpointing


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _table(title: str, header: list[str], paths: list[Path], rows: Callable[[Path, Any], list[list[str]]]) -> list[str]:
    """A markdown section: ``title``, a table of ``header``, the rows each JSON file in ``paths`` gives
    (``rows(path, data)``), and a "failed" row for a file that is missing or unreadable."""
    lines = ["", f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for path in paths:
        data = _load(path)
        if not data:
            lines.append(f"| {path.stem} | failed (see {path.stem}.txt) " + "|" * (len(header) - 1))
            continue
        lines += ["| " + " | ".join(cells) + " |" for cells in rows(path, data)]
    return lines


def summary(out: Path) -> str:
    lines = [f"# GPU measurements ({out.name})", ""]
    env = _load(out / "env.json") or {}
    lines += [f"torch {env.get('torch')}, CUDA {env.get('cuda')}, device: {env.get('gpu') or 'CPU (smoke run)'}", ""]
    tests = (out / "tests.txt").read_text().strip().splitlines() if (out / "tests.txt").exists() else []
    lines += ["## CUDA-only tests", "", f"`{tests[-1] if tests else 'not run'}`", ""]

    agg = _load(out / "aggregation.json")
    lines += ["## Aggregation (FedMomentum, the LLaMA-2-7B adapter set)", ""]
    if agg:
        routes = agg["routes"]
        for name in ("fedlora.aggregate", "fedlora.aggregate(tau=1)", "dense.svd"):
            if name in routes:
                lines.append(f"- {name}: {routes[name]['median_s']:.4g} s ({routes[name].get('measured', '')})")
        lines += [f"- target {k}: {'met' if v else 'MISSED'}" for k, v in agg["targets"].items()]
    else:
        lines.append("- missing (see aggregation.txt)")
    lines.append("")

    def round_row(path: Path, r: dict[str, Any]) -> list[list[str]]:
        s = r["summary"]
        return [[
            path.stem,
            f"{s['round_seconds_excl_eval']:.3g}",
            f"{100 * s['overhead_fraction']:.1f} %",
            f"{s['federated_tokens_per_s']:.4g}",
            f"{s['plain_tokens_per_s']:.4g}",
            f"{s['federated_vs_plain_throughput']:.3f}",
            f"{s['peak_mib_federated']:.0f} / {s['peak_mib_plain']:.0f}",
        ]]  # fmt: skip

    lines += _table(
        "One round against plain PEFT (round.py)",
        ["run", "round s", "overhead", "fed tok/s", "plain tok/s", "fed/plain", "peak MiB fed / plain"],
        sorted(out.glob("round-*.json")),
        round_row,
    )[1:]  # no blank line: the aggregation section ends with one
    verdicts: list[str] = []

    def memory_row(path: Path, m: dict[str, Any]) -> list[list[str]]:
        a = m["args"]
        if (a["shape"], a["quantization"], a["gradient_checkpointing"]) == ("7b", "nf4", True) and a["device"] != "cpu":
            total = m["measured"]["total"]
            verdict = "met" if total <= TARGET_7B_NF4_BYTES else "MISSED"
            verdicts.append(f"7B nf4 target <= 10 GB: {total / 1e9:.2f} GB measured: **{verdict}**")
        return [[path.stem, *(f"{p:.0f} / {q:.0f}" for p, q in m["comparison_mib"].values())]]

    lines += _table(
        "Memory model (memory.py): predicted / measured MiB",
        ["run", "base weights", "LoRA + optimizer", "step", "total"],
        sorted(out.glob("memory-*.json")),
        memory_row,
    )
    for verdict in verdicts:
        lines += ["", verdict]
    runs = sorted((out / "runs").glob("*/metrics.jsonl")) if (out / "runs").is_dir() else []
    if runs:
        lines += ["", "## Side path on the default run (train seconds per round; side rank mean / max, MiB)", ""]
        for path in runs:
            recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            cells = []
            for r in recs:
                if r.get("phase") != "train":
                    continue
                b = r.get("backbone") or {}
                mib = b.get("side_bytes", 0) / 2**20
                side = f"{b['side_rank_mean']:.0f}/{b['side_rank_max']:.0f}, {mib:.0f}" if b else "-"
                cells.append(f"r{r['round']}: {r['seconds']['train']:.1f} s ({side})")
            lines.append(f"- {path.parent.name}: " + "; ".join(cells))
    packing = sorted(out.glob("packing-*.json"))
    if packing:
        lines += _table(
            "Padding-free batches (packing.py): useful tokens/s padded / packed",
            ["attention", "preset", "padded share", "padded", "packed", "speed-up"],
            packing,
            lambda _, rows: [
                [
                    r["attention"],
                    r["preset"],
                    f"{100 * r['padded_share']:.1f} %",
                    f"{r['pad']['useful_tokens_per_s']:.0f}",
                    f"{r['flatten']['useful_tokens_per_s']:.0f}",
                    f"{r['speedup']:.2f}x",
                ]
                for r in rows
            ],
        )
    reload = _load(out / "reload.json")
    if reload:
        lines += [
            "",
            f"## Reload per client call against a factor swap ({reload['model']}, {reload['quantization']}, "
            f"{reload['device']})",
            "",
            f"reload {reload['reload_s']:.2f} s, swap {1000 * reload['swap_s']:.1f} ms",
        ]
    dps = sorted(out.glob("dpsgd-*.json"))
    if dps:
        lines += _table(
            "DP-SGD against a plain local step (dpsgd.py): seconds per step, peak MiB",
            ["run", "plain s", "DP-SGD s", "DP / plain", "peak MiB plain / DP"],
            dps,
            lambda path, d: [
                [
                    path.stem,
                    f"{d['plain']['step_s']:.3g}",
                    f"{d['dp']['step_s']:.3g}",
                    f"{d['dp_over_plain_time']:.2f}x",
                    f"{d['plain']['peak_mib']:.0f} / {d['dp']['peak_mib']:.0f}",
                ]
            ],
        )
    mom = _load(out / "momentum.json")
    if mom:
        a = mom["args"]
        lines += [
            "",
            f"## Momentum diagnostics against the aggregation (momentum.py: {a['layers']} layers at "
            f"{a['hidden']}/{a['intermediate']}, {a['clients']} clients, r={a['rank']}): seconds per round",
            "",
            "| method | aggregate s | momentum s | momentum / aggregate |",
            "|---|---|---|---|",
        ]
        for name, r in mom["methods"].items():
            lines.append(f"| {name} | {r['aggregate_s']:.3g} | {r['observe_s']:.3g} | {r['ratio']:.2f}x |")

    def backends_row(path: Path, b: dict[str, Any]) -> list[list[str]]:
        lt, rt = b["local"]["median_train_seconds"], b["ray"]["median_train_seconds"]
        return [[
            path.stem,
            str(b["settings"]["workers"]),
            f"{lt:.2f}",
            f"{rt:.2f}",
            f"{b['train_speedup_after_round_1']:.2f}x",
            f"{b['parallel_ceiling']:.2f}x" if "parallel_ceiling" in b else "-",
            f"{b['local']['startup_seconds']:.1f} / {b['ray']['startup_seconds']:.1f}",
            ", ".join(f"{m:.0f}" for m in b["ray"]["worker_rss_mib"]),
            str(b["records_identical"]),
        ]]  # fmt: skip

    backends = sorted(out.glob("backends-*.json"))
    if backends:
        lines += _table(
            "Clients in parallel (backends.py): client training per round, local against ray",
            ["run", "workers", "local s", "ray s", "speed-up", "perfect-parallel ceiling", "start-up local / ray s",
             "worker RSS MiB", "records identical"],
            backends,
            backends_row,
        )  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(summary(Path(sys.argv[1])), end="")
