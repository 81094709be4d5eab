"""The momentum diagnostics' cost per round (engine/momentum.py) against the aggregation itself.

A LLaMA-shaped adapter set (``--layers`` x q/k/v/o/gate/up/down at ``--hidden``/``--intermediate``),
``--clients`` uploads per round built around the current global factors (``B + eps E``,
``A + eps F``, as benchmarks/aggregation.py builds round 0), ``--rounds`` rounds of each method:
the time of ``method.aggregate`` and of ``MomentumTracker.observe`` (the engine calls both once a
round), per round, median over rounds 2.. (round 1 has no path or previous update yet). The
backbone sum ``L`` grows with the rounds for methods that merge (FedEx-LoRA, FLoRA, FedMomentum),
so later rounds cost more until ``L``'s rank reaches ``min(d_out, d_in)``.

    python benchmarks/momentum.py --json benchmarks/momentum-cpu-135m.json               # SmolLM2-135M shapes
    python benchmarks/momentum.py --hidden 4096 --intermediate 11008 --layers 2 --clients 10 --rank 16
    python benchmarks/momentum.py --device cuda --hidden 4096 --intermediate 11008 --layers 32 --clients 10 --rank 16
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aggregation
from fedlora.engine.momentum import initial_tracker
from fedlora.methods import ClientUpload, GlobalState, ModuleFactors, build_method


def uploads_around(state: GlobalState, clients: int, eps: float, gen: torch.Generator) -> list[ClientUpload]:
    """``clients`` uploads ``(B + eps E_i, A + eps F_i)`` around ``state``'s factors."""
    out = []
    for c in range(clients):
        factors = {}
        for m, f in state.factors.items():
            B = f.B + torch.randn(f.B.shape, generator=gen, device=f.B.device) * (eps / math.sqrt(f.B.shape[0]))
            A = f.A + torch.randn(f.A.shape, generator=gen, device=f.A.device) * (eps / math.sqrt(f.A.shape[1]))
            factors[m] = ModuleFactors(A=A, B=B)
        out.append(ClientUpload(f"client{c}", factors, 100 + 37 * c))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_method(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    method = build_method(name)
    state, _ = aggregation.build_round(args.layers, args.clients, args.rank, device, 0, args.eps, 0.8)
    tracker = initial_tracker(state.factors)
    gen = torch.Generator(device=device).manual_seed(1)
    agg, obs, ranks = [], [], []
    for _ in range(args.rounds):
        uploads = uploads_around(state, args.clients, args.eps, gen)
        sync(device)
        t0 = time.perf_counter()
        result = method.aggregate(state, uploads)
        sync(device)
        t1 = time.perf_counter()
        tracker.observe(method, state, result.state, result.backbone_delta, uploads, result.report, device)
        sync(device)
        t2 = time.perf_counter()
        agg.append(t1 - t0)
        obs.append(t2 - t1)
        ranks.append(max((d.rank for d in tracker.backbone.values()), default=0))
        state = result.state
    later = slice(1, None) if args.rounds > 1 else slice(None)
    return {
        "aggregate_s": statistics.median(agg[later]),
        "observe_s": statistics.median(obs[later]),
        "observe_last_s": obs[-1],
        "ratio": statistics.median(obs[later]) / max(statistics.median(agg[later]), 1e-9),
        "backbone_rank_last": ranks[-1],
        "per_round": {"aggregate_s": agg, "observe_s": obs},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--eps", type=float, default=0.1, help="client perturbation scale")
    ap.add_argument("--methods", default="fedit,ffa_lora,flora,fedex_lora,fedmomentum")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    aggregation.PROJECTIONS = aggregation.projections(args.hidden, args.intermediate)
    device = torch.device(args.device)
    out: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k != "json"}}
    out["machine"] = aggregation.machine_info(device)
    out["methods"] = {}
    print(
        f"{args.layers} layers at {args.hidden}/{args.intermediate}, {args.clients} clients, rank {args.rank}, "
        f"{args.rounds} rounds on {device}: median per round over rounds 2..{args.rounds}"
    )
    print(f"{'method':<12} {'aggregate':>10} {'momentum':>10} {'ratio':>7} {'L rank':>7}")
    for name in args.methods.split(","):
        r = run_method(name, args, device)
        out["methods"][name] = r
        times = f"{r['aggregate_s']:>9.3f}s {r['observe_s']:>9.3f}s {r['ratio']:>7.2f}"
        print(f"{name:<12} {times} {r['backbone_rank_last']:>7}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
