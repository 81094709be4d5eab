"""A worker that holds one base model and swaps clients' factors in (fedlora) against one that
reloads the model for every client call (FlowerTune's ClientApp: ``client_fn`` loads the base
model, wraps it with PEFT and sets the global LoRA weights, every round, for every client).

Measured per client call, on the config's model (``--preset``, ``--set model.name=...``):

* ``reload``: ``from_pretrained`` of the base (quantized if configured) + ``get_peft_model`` +
  the global factors set (fedlora's own loader and ``LoRABinding``, so both sides load the same
  way);
* ``swap``: ``LoRABinding.set_factors`` of another client's factors plus ``set_trainable`` (what
  ``fedlora.engine.client.client_round`` does before training).

Both are then put against one client's local training time per round from the same machine
(``--train-seconds``, e.g. from ``benchmarks/backends.py``), the share of a round a reload costs.

    python benchmarks/reload.py --preset ci --repeats 3 --json benchmarks/reload-cpu.json
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch


def measure(preset: str, sets: dict[str, str], repeats: int, swaps: int) -> dict[str, Any]:
    from fedlora.configs import preset_path
    from fedlora.engine.config import load_config
    from fedlora.engine.setup import build_binding, device_for

    cfg = load_config(preset_path(preset), sets)
    device = device_for(cfg.model.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tokenizer, binding = build_binding(cfg, device)
    factors = binding.get_factors()
    reloads = []
    for _ in range(repeats):
        del binding
        if device.type == "cuda":
            torch.cuda.empty_cache()
        start = time.perf_counter()
        _tok, binding = build_binding(cfg, device)
        binding.set_factors(factors)
        binding.set_trainable()
        sync()
        reloads.append(time.perf_counter() - start)
    other = {m: type(f)(f.A + 0.01, f.B + 0.01) for m, f in factors.items()}
    swap_times = []
    for k in range(swaps):
        start = time.perf_counter()
        binding.set_factors(other if k % 2 else factors)
        binding.set_trainable()
        sync()
        swap_times.append(time.perf_counter() - start)
    return {
        "preset": preset,
        "model": cfg.model.name,
        "quantization": cfg.model.quantization,
        "device": str(device),
        "lora_modules": len(factors),
        "reload_s": statistics.median(reloads),
        "reload_all_s": reloads,
        "swap_s": statistics.median(swap_times),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="ci")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--repeats", type=int, default=3, help="timed reloads")
    p.add_argument("--swaps", type=int, default=20, help="timed factor swaps")
    p.add_argument("--train-seconds", type=float, default=None, help="one client's training per round, for the share")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    r = measure(args.preset, dict(s.split("=", 1) for s in args.set), args.repeats, args.swaps)
    if args.train_seconds:
        r["train_seconds"] = args.train_seconds
        r["reload_share_of_client_round"] = r["reload_s"] / (r["reload_s"] + args.train_seconds)
        r["swap_share_of_client_round"] = r["swap_s"] / (r["swap_s"] + args.train_seconds)
    print(
        f"{r['model']} ({r['quantization']}, {r['device']}, {r['lora_modules']} LoRA modules): "
        f"reload per call {r['reload_s']:.2f} s, swap {1000 * r['swap_s']:.1f} ms "
        f"({r['reload_s'] / r['swap_s']:.0f}x)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return r


if __name__ == "__main__":
    main()
