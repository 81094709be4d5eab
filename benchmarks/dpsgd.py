"""DP-SGD's cost against a plain local step (``privacy.mode=sample``): time per optimizer step and
peak memory, on the real training loop.

A randomly initialised LLaMA of ``--shape`` (``memory.py``'s shapes: ``micro``/``tiny`` for a CPU,
``1b``/``7b`` for a GPU), LoRA on every linear layer through fedlora's ``LoRABinding``, random
token rows of ``--seq`` tokens. Both arms run ``fedlora.engine.train.train_local`` for ``--steps``
steps after ``--warmup`` steps: plain (loss backward, clip, AdamW) and DP-SGD (Opacus's per-example
hooks attached once, per-example clipping, noise, AdamW; ``fedlora.privacy.dpsgd``). Per-example
gradients hold ``batch x LoRA parameters`` floats per micro-batch, so their memory grows with the
batch and the rank, not with the base.

    python benchmarks/dpsgd.py --device cpu --shape micro --json benchmarks/dpsgd-cpu.json
    python benchmarks/dpsgd.py --device cuda --shape 1b --dtype bfloat16 --quantization nf4 --json out.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aggregation import _status_kib, machine_info, sync
from memory import TARGETS, random_llama


def batches(vocab: int, batch: int, seq: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(1, vocab, (batch, seq), generator=g)
        yield {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": ids.to(device)}


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _status_kib("VmHWM") / 1024


def measure(args: argparse.Namespace, dp: bool) -> dict[str, Any]:
    from fedlora.engine.client import causal_or_cls_loss
    from fedlora.engine.config import TrainConfig
    from fedlora.engine.train import DPSGD, train_local
    from fedlora.model.binding import LoRABinding, LoRASettings
    from fedlora.privacy import seeded_generator

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    model = random_llama(args.shape, dtype, args.device, args.seq, args.quantization)
    lora = LoRASettings(rank=args.rank, alpha=2.0 * args.rank, targets=tuple(TARGETS))
    binding = LoRABinding(model, lora, "CAUSAL_LM")
    params = binding.set_trainable(frozenset("AB"))
    precision = "float32" if dtype == torch.float32 else "bfloat16"
    cfg = TrainConfig(lr=1e-4, batch_size=args.batch, max_steps=1, precision=precision, clip=1.0)
    rows = batches(model.config.vocab_size, args.batch, args.seq, device)
    noise = DPSGD(1.0, 1.0, seeded_generator(0, "bench")) if dp else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stamps: list[float] = []

    def on_step(step: int, loss: float) -> None:  # one round of steps: the hooks attach once, as in a run
        sync(device)
        stamps.append(time.perf_counter())

    n = args.warmup + args.steps + 1
    train_local(model, params, rows, causal_or_cls_loss, cfg, steps=n, round_=0, num_rounds=1, dp=noise,
                on_step=on_step)
    times = [b - a for a, b in zip(stamps[args.warmup :], stamps[args.warmup + 1 :])]
    size = sum(p.numel() for p in params)
    return {"step_s": statistics.median(times), "steps": len(times), "peak_mib": peak_mib(device), "lora_params": size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default="micro")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--quantization", default="none", choices=["none", "nf4", "int8"])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--arm", choices=["plain", "dp"], help="one arm only (the peak memory is per process)")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.arm:  # a child: one arm, its own peak
        print(json.dumps(measure(args, args.arm == "dp")))
        return
    import subprocess

    out: dict[str, Any] = {"machine": machine_info(torch.device(args.device)), "args": vars(args)}
    for arm in ("plain", "dp"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--arm", arm]
        cmd = [c for i, c in enumerate(cmd) if not (c == "--json" or (i and cmd[i - 1] == "--json"))]
        res = subprocess.run(cmd, check=True, capture_output=True, text=True)
        out[arm] = json.loads(res.stdout.strip().splitlines()[-1])
    out["dp_over_plain_time"] = out["dp"]["step_s"] / out["plain"]["step_s"]
    out["dp_over_plain_peak"] = out["dp"]["peak_mib"] / out["plain"]["peak_mib"]
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
