"""The ``fedlora`` command line: ``methods``, ``aggregate`` (more subcommands join as runtimes land)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence


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
    p.add_argument("--json", action="store_true", help="also print the aggregation report as JSON")
    p.set_defaults(func=_cmd_aggregate)
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
