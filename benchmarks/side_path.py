"""The side path's cost by simulation of its ranks: memory and extra FLOPs per step over rounds.

Each backbone-merging method adds at most ``q`` components per module per round (K clients of
rank r): FedMomentum (tau = 1) the aggregate beyond its rank-r LoRA, ``(K - 1) r``; FLoRA the
stacked product of every client, ``K r``; FedEx-LoRA the residual of averaging factors,
``(K + 1) r``; FRLoRA and FedSmoothLoRA the rank-r round update, ``r``. The side path of one
module after t rounds then has rank ``min(t q, cap, min(d_out, d_in))`` at most (the exact
re-factoring keeps only the true rank, which correlated rounds keep lower: this is the worst
case). Its cost per adapted module: ``4 (d_in + d_out) k`` bytes of float32 factors, and
``2 k (d_in + d_out)`` FLOPs per token beside the base matmul's ``2 d_in d_out``.

    python benchmarks/side_path.py --shape 7b --clients 10 --rank 16 --rounds 100
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import SHAPES, linear_shapes

PER_ROUND = {  # components added per module per round, in units of (K, r)
    "fedmomentum": lambda k, r: (k - 1) * r,
    "flora": lambda k, r: k * r,
    "fedex_lora": lambda k, r: (k + 1) * r,
    "frlora": lambda k, r: r,
    "fedsmooth_lora": lambda k, r: r,
}


def cost(shape: str, method: str, clients: int, rank: int, rounds: int, cap: int | None) -> dict[str, float]:
    """Worst-case side-path rank, float32 bytes and extra FLOP fraction after ``rounds`` rounds."""
    layers = SHAPES[shape]["num_hidden_layers"]
    lins = linear_shapes(SHAPES[shape])
    grow = PER_ROUND[method](clients, rank) * rounds
    ks = [min(grow, cap or grow, min(o, i)) for o, i in lins]
    nbytes = layers * sum(4 * (o + i) * k for (o, i), k in zip(lins, ks))
    extra = sum(2 * k * (o + i) for (o, i), k in zip(lins, ks)) / sum(2 * o * i for o, i in lins)
    return {"rank_max": float(max(ks)), "gib": nbytes / 2**30, "extra_flops": extra}


def table(args: argparse.Namespace) -> str:
    rows = [
        f"{args.shape}, K = {args.clients} clients/round, r = {args.rank}: worst-case side path "
        "(rank / float32 GiB / extra FLOPs of the adapted matmuls)",
        "",
        "| method | cap | " + " | ".join(f"round {t}" for t in args.at) + " |",
        "|---|---|" + "---|" * len(args.at),
    ]
    for method in PER_ROUND:
        for cap in (None, *args.caps):
            cells = []
            for t in args.at:
                c = cost(args.shape, method, args.clients, args.rank, t, cap)
                cells.append(f"{c['rank_max']:.0f} / {c['gib']:.2f} / {100 * c['extra_flops']:.1f} %")
            rows.append(f"| {method} | {cap or 'none'} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--at", type=int, nargs="+", default=[1, 10, 100])
    p.add_argument("--caps", type=int, nargs="*", default=[64, 256])
    print(table(p.parse_args(argv)))


if __name__ == "__main__":
    main()
