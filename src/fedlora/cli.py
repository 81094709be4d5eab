"""The ``fedlora`` command line: ``run``, ``compare``, ``aggregate``, ``methods``, ``export``, ``eval``, ``study``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from fedlora.configs import preset_names, preset_path


def parse_assignments(items: Sequence[str] | None, flag: str = "--set") -> dict[str, str]:
    """``["tau=0.99", "split=left"]`` -> ``{"tau": "0.99", "split": "left"}``."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} expects name=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _cmd_methods(args: argparse.Namespace) -> int:
    from fedlora.methods import describe_methods

    print(describe_methods())
    return 0


def _cmd_aggregate(args: argparse.Namespace) -> int:
    from fedlora.offline import aggregate_folders

    report = aggregate_folders(
        args.method,
        args.clients,
        args.out,
        weights=args.weights,
        global_dir=args.global_dir,
        round_=args.round,
        settings=parse_assignments(args.set),
        device=args.device,
    )
    deltas = report["backbone_delta_ranks"]
    print(
        f"{report['method']}: round {report['round']} -> {report['next_round']}, "
        f"{len(report['clients'])} clients, {report['num_modules']} modules; "
        f"bytes up {report['bytes_up']:,}, down/client {report['bytes_down_per_client']:,}"
    )
    if deltas:
        ranks = [r for r in deltas.values() if r]
        print(f"backbone delta: {len(ranks)} modules, ranks {min(ranks, default=0)}..{max(ranks, default=0)}")
    print(f"wrote {args.out}")
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from pathlib import Path

    from fedlora.engine.config import load_config
    from fedlora.engine.local import run_experiment

    overrides = parse_assignments(args.set)
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise ValueError(f"{run_dir}: not a run folder (no config.yaml)")
        overrides.setdefault("output_dir", str(run_dir.parent))
        overrides.setdefault("name", run_dir.name)
        cfg = load_config(run_dir / "config.yaml", overrides)
    else:
        if args.config and not Path(args.config).exists() and args.config in preset_names():
            raise ValueError(f"{args.config}: no such file; the shipped preset runs with --preset {args.config}")
        source = args.config if args.config else preset_path(args.preset)
        cfg = load_config(source, overrides)
        if cfg.run_dir.exists() and (cfg.run_dir / "checkpoint").exists() and not args.overwrite:
            raise ValueError(
                f"{cfg.run_dir} already holds a run: --resume {cfg.run_dir} continues it, "
                "--overwrite starts again, --set name=NEW writes elsewhere"
            )
    summary = run_experiment(cfg, resume=bool(args.resume), progress=not args.no_progress)
    _print_summary(summary, cfg.run_dir)
    if summary["rounds"] and summary["skipped_rounds"] >= summary["rounds"]:
        print(f"error: every round was skipped: nothing was trained ({_skip_reasons(cfg.run_dir)})", file=sys.stderr)
        return 1
    return 0


def _skip_reasons(run_dir) -> str:
    """The distinct reasons clients were rejected, from the run's metrics (most frequent first)."""
    from collections import Counter

    from fedlora.runs.report import load_run

    reasons: Counter[str] = Counter()
    for record in load_run(run_dir).records:
        reasons.update(str(x.get("reason", "")).split(":")[0] for x in record.get("rejected", []))
    if not reasons:
        return "no client upload was accepted; see rounds.min_clients"
    return "rejected uploads: " + ", ".join(f"{r} ({n}x)" for r, n in reasons.most_common(3))


def _print_summary(summary: dict, run_dir) -> None:
    base, final = summary.get("baseline") or {}, summary.get("final") or {}
    print(
        f"\n{summary['method']} on {summary['name']}: {summary['rounds']} rounds, "
        f"{summary['bytes_total'] / 1e6:.1f} MB communicated, {summary['seconds']:.0f} s"
    )
    keys = [k for k in (final or base) if k != "n"]
    if keys:
        print(f"{'metric':<16}{'untuned base':>14}{'federated':>12}")
        for k in keys:
            b = f"{base[k]:.4f}" if k in base else "-"
            f = f"{final[k]:.4f}" if k in final else "-"
            print(f"{k:<16}{b:>14}{f:>12}")
    privacy = summary.get("privacy")
    if privacy:
        sigma = f"{privacy['noise_multiplier']:.3g}"
        if "noise_multiplier_min" in privacy:  # sample mode: each client its own
            sigma = f"{privacy['noise_multiplier_min']:.3g}-{sigma} (per client)"
        print(
            f"privacy: {privacy['mode']}-level DP, epsilon {privacy['epsilon']:.3g} at delta {privacy['delta']:g} "
            f"({privacy['accountant']}; noise multiplier {sigma}, clip {privacy['clip']:g})"
        )
    print(f"results: {run_dir}/ (metrics.jsonl, summary.json, curves.png, final/)")


def _cmd_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedlora.runs.report import compare_runs

    print(compare_runs([Path(r) for r in args.runs], Path(args.plot) if args.plot else None))
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from fedlora.engine.config import _parse_scalar
    from fedlora.study import load_spec, run_study, write_report
    from fedlora.study.spec import cell_filter

    spec = load_spec(args.spec)
    extra = {k: _parse_scalar(v) for k, v in parse_assignments(args.set).items()}
    only = {k: [_parse_scalar(x) for x in v.split(",")] for k, v in parse_assignments(args.only, "--only").items()}
    keep = cell_filter(spec, only) if only else None
    cells = [c for c in spec.cells(extra) if keep is None or keep(c)]
    if not args.report_only:
        print(f"study {spec.name}: {len(cells)} cells -> {spec.output_dir}/, report -> {spec.report_dir}/", flush=True)
        run_study(spec, extra, progress=args.progress, echo=lambda line: print(line, flush=True), only=keep)
    report = write_report(spec, extra)
    done = sum(c.status == "finished" for c in report.cells)
    print(f"report of {done}/{len(report.cells)} finished cells: {spec.report_dir / 'report.md'} (+ report.json, PNGs)")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedlora.engine.config import load_config
    from fedlora.model.export import export_merged

    run = Path(args.run)
    cfg = load_config(run / "config.yaml")
    out = export_merged(cfg.model.name, run / "final", args.out, kind=cfg.model.kind, num_labels=cfg.model.num_labels)
    print(f"wrote a merged model to {out}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from pathlib import Path

    from fedlora.engine.evaluate import evaluate_run, evaluate_saved, is_adapter_dir
    from fedlora.model.adapter_io import CONFIG_NAME, WEIGHTS_NAME

    overrides = parse_assignments(args.set)
    if args.harness:
        return _eval_harness(args, overrides)
    for flag in ("tasks", "num_fewshot", "limit", "include_path", "adapter"):
        if getattr(args, flag) is not None:
            raise ValueError(f"--{flag.replace('_', '-')} goes with --harness lm-eval")
    path = Path(args.path) if args.path else None
    is_run = path is not None and (path / "config.yaml").is_file()
    if path is not None and not is_run:
        if not path.exists():
            raise ValueError(f"no such folder: {path}")
        if not path.is_dir():
            raise ValueError(f"{path}: a file, not a run folder or a PEFT adapter folder")
        if not is_adapter_dir(path):
            raise ValueError(
                f"{path}: not a run folder (no config.yaml) and not a PEFT adapter folder ({CONFIG_NAME} + "
                f"{WEIGHTS_NAME}); for a merged model pass it as --model without a positional folder"
            )
    if is_run and (args.model or args.task):
        raise ValueError(f"{path} is a run folder: its config names the model and task (use --set to change them)")
    if not is_run and (not args.model or not args.task):
        raise ValueError("an adapter folder or a plain model needs --model and --task (a run folder needs neither)")
    if is_run:
        result = evaluate_run(path, overrides, out=args.out)
    else:
        result = evaluate_saved(path, model=args.model, task=args.task, overrides=overrides, out=args.out)
    what = result.get("run") or result.get("adapter") or result["model"]
    print(f"{result['task']} on {what}: {result['n_test']} test examples")
    for k, v in result["metrics"].items():
        print(f"{k:<24}{v:>12.4f}" if isinstance(v, float) else f"{k:<24}{v!s:>12}")
    if result.get("path"):
        print(f"wrote {result['path']}")
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def _limit(text: str) -> float | int:
    """``--limit``: a count (>= 1) or a fraction of each task's examples (< 1)."""
    value = float(text)
    return int(value) if value >= 1 and value.is_integer() else value


def _batch_size(text: str) -> int | str:
    """``--batch-size``: a positive count, ``auto`` or ``auto:N`` (lm-eval's spellings)."""
    if text.isdigit() and int(text) > 0:
        return int(text)
    if text == "auto" or (text.startswith("auto:") and text[5:].replace(".", "", 1).isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected a positive count, auto or auto:N, got {text!r}")


def _eval_harness(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from pathlib import Path

    from fedlora.engine.harness import lm_eval_run, lm_eval_version, result_table

    lm_eval_version()  # a missing package is named before anything else is read
    if not args.path or not (Path(args.path) / "config.yaml").is_file():
        raise ValueError(
            f"--harness lm-eval evaluates a run folder (RUN_DIR with config.yaml), got {args.path or 'none'}; "
            "for another adapter of the run pass --adapter DIR"
        )
    if args.model or args.task:
        raise ValueError("--harness lm-eval takes the model from RUN_DIR's config and the tasks from --tasks")
    if not args.tasks:
        raise ValueError("--harness lm-eval needs --tasks T1,T2 (lm-eval task, group or tag names)")
    result = lm_eval_run(
        args.path,
        args.tasks,
        adapter=args.adapter,
        overrides=overrides,
        out=args.out,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        batch_size=args.batch_size,
        include_path=args.include_path or (),
    )
    print(f"lm-eval {result['harness_version']} on {result['run']} (adapter {result['adapter']}):")
    print(result_table(result))
    print(f"wrote {result['path']}")
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlora", description="Federated fine-tuning of LLMs with LoRA.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("methods", help="list the methods and their settings")
    p.set_defaults(func=_cmd_methods)

    p = sub.add_parser(
        "aggregate",
        help="aggregate PEFT adapter folders offline (one server round)",
        description="Aggregate clients' PEFT adapter folders with a registered method. OUT receives a PEFT "
        "adapter (the new global LoRA), backbone_delta.safetensors for methods that change the backbone "
        "(W <- W + delta_up @ delta_down per module) and aggregation.json.",
    )
    p.add_argument("clients", nargs="+", metavar="CLIENT_DIR", help="client adapter folders (save_pretrained)")
    p.add_argument("--method", required=True, help="method name (see `fedlora methods`)")
    p.add_argument(
        "--weights", nargs="+", type=float, metavar="W", help="aggregation weights, e.g. sample counts (default: equal)"
    )
    p.add_argument("--global", dest="global_dir", metavar="DIR", help="the round-start global adapter folder")
    p.add_argument("--round", type=int, help="0-based round index (default: from --global's aggregation.json, else 0)")
    p.add_argument(
        "--set", action="append", metavar="NAME=VALUE", help="method setting, repeatable (e.g. --set tau=0.99)"
    )
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="output folder (must not exist or be empty)")
    p.add_argument("--device", help="where to run the QRs/SVDs, e.g. cuda (default: cpu)")
    p.add_argument("--json", action="store_true", help="also print the aggregation report as JSON")
    p.set_defaults(func=_cmd_aggregate)

    p = sub.add_parser(
        "run",
        help="run a federated fine-tuning experiment on one machine (default: the shipped default)",
        description="Run a federated fine-tuning experiment. With no CONFIG, runs the shipped preset "
        "(--preset, default 'default': SmolLM2-135M, FedMomentum, generated math problems; ~1,200 CPU-seconds, "
        "at least 10 min on 2 cores).",
    )
    p.add_argument("config", nargs="?", help="YAML config file (see docs/config.md)")
    p.add_argument(
        "--preset",
        default="default",
        help=f"shipped config to run when no CONFIG is given: {', '.join(preset_names())} (default: default)",
    )
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. --set train.lr=1e-3"
    )
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run of the same name")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "export",
        help="save a run's final model, fully merged, with save_pretrained",
        description="Merge a finished run's model into plain weights: the base model named in RUN_DIR/config.yaml, "
        "plus the run's backbone delta (RUN_DIR/final/backbone_delta.safetensors, for methods that change the "
        "backbone), plus its final LoRA (RUN_DIR/final/). DIR receives a plain transformers model "
        "(save_pretrained: config.json + safetensors weights) and the base model's tokenizer, loadable with "
        "AutoModelForCausalLM / AutoModelForSequenceClassification.from_pretrained(DIR) without PEFT or fedlora; "
        "`fedlora eval --model DIR --task TASK` evaluates it.",
    )
    p.add_argument("run", metavar="RUN_DIR", help="a finished run folder (runs/NAME, holding final/)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the merged model and tokenizer to")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "eval",
        help="evaluate a finished run, an adapter folder or a model on a task's test set",
        description="Evaluate a saved model on its task's test set. RUN_DIR (runs/NAME): the base model, final/ "
        "adapter and backbone delta of the run, on the run's task, settings and seed; writes RUN_DIR/eval.json. "
        "An ADAPTER_DIR needs --model (its base) and --task; with no folder, --model itself (e.g. a merged "
        "export) is evaluated on --task.",
    )
    p.add_argument("path", nargs="?", metavar="RUN_DIR|ADAPTER_DIR", help="a run folder or a PEFT adapter folder")
    p.add_argument("--model", help="base model (with ADAPTER_DIR) or the model to evaluate: folder, hub id, offline:*")
    p.add_argument("--task", help="task name (with ADAPTER_DIR or --model alone)")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="config override, e.g. --set task.settings.n_test=100"
    )
    p.add_argument(
        "--out",
        metavar="JSON",
        help="write the result here (default: RUN_DIR/eval.json for a run, RUN_DIR/eval/lm_eval.json with --harness)",
    )
    p.add_argument("--json", action="store_true", help="also print the whole result as JSON")
    g = p.add_argument_group(
        "harness",
        "--harness lm-eval evaluates RUN_DIR's final model (base + backbone delta + adapter, in memory) with "
        "lm-evaluation-harness (pip install 'fedlora[eval]') on --tasks; hub tasks (gsm8k, arc_easy, hellaswag, "
        "mmlu) need the network or a filled HF_DATASETS_CACHE",
    )
    g.add_argument("--harness", choices=["lm-eval"], help="evaluate with an external harness instead of the task")
    g.add_argument("--tasks", metavar="T1,T2", help="lm-eval task, group or tag names (or task YAML files)")
    g.add_argument("--num-fewshot", type=int, metavar="N", help="few-shot examples (default: each task's own)")
    g.add_argument("--limit", type=_limit, metavar="N|F", help="at most N examples per task, or a fraction F < 1")
    g.add_argument(
        "--batch-size", type=_batch_size, default=1, metavar="N|auto", help="lm-eval batch size (default: 1)"
    )
    g.add_argument("--include-path", action="append", metavar="DIR", help="folder of extra task YAMLs, repeatable")
    g.add_argument("--adapter", metavar="DIR", help="adapter folder to evaluate instead of RUN_DIR/final")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "compare",
        help="one table and shared plots for several runs",
        description="Compare finished (or interrupted) runs: prints one table, a row per run, with each run's "
        "FINAL metric (the last evaluated round, not the running max over rounds, which overstates a result), "
        "its untuned-base value and best round for reference, MB communicated, wall time, rejected updates and "
        "skipped rounds. With --plot, writes a PNG of every run's curves on shared axes (metric by round, metric "
        "by MB communicated, training loss). Prints a 'warning:' line when the runs were evaluated on different "
        "test sets (their task, dataset, test-set settings, data seed or number of test examples differ).",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (runs/NAME, holding metrics.jsonl)")
    p.add_argument("--plot", metavar="PNG", help="write the runs' curves on shared axes")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser(
        "study",
        help="run a grid of experiments (methods x settings x seeds) and write its report",
        description="Run every cell of a study spec (see src/fedlora/configs/study_glue.yaml) as a normal run, "
        "one after another, skipping cells already finished (resumable); a failing cell is reported and the "
        "study goes on. Then write report.md (tables, mean +- std over seeds), report.json and plots.",
    )
    p.add_argument("spec", metavar="SPEC", help="study spec YAML, or a shipped one (study_glue, study_math, ...)")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config key in every cell (model.device=cuda)"
    )
    p.add_argument(
        "--only",
        action="append",
        metavar="AXIS=V1[,V2]",
        help="run only the cells with these grid values (seed=0, partition.alpha=0.5); the report still covers "
        "every finished cell",
    )
    p.add_argument("--report-only", action="store_true", help="only (re)write the report from the existing runs")
    p.add_argument("--progress", action="store_true", help="show each run's progress bar")
    p.set_defaults(func=_cmd_study)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:
        print(f"fedlora {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
