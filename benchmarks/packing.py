"""Useful (non-pad) tokens per second of LoRA training, right-padded rows against padding-free
packed rows (issue #16, "no wasted tokens"; ``train.packing``, :mod:`fedlora.model.packing`).

For each preset the run's own model, LoRA and task batches (``train.batch_size`` examples in a
seeded shuffle, the task's ``collate``) train with AdamW, one optimizer step per batch, in both
forms: the same batch padded, then packed (alternating, so machine load drifts over both alike;
each form has its own copy of the adapter). Reported per form: seconds per step, useful tokens/s
(real tokens / time), computed tokens per step, and the mean loss of the first step of each
batch from the same starting factors (a check that both forms compute the same thing).

    python benchmarks/packing.py --presets default instruction --steps 12 --json benchmarks/packing-cpu.json
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import copy
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch


def _step(
    binding: Any, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor], sync: Any
) -> tuple[float, float]:
    from fedlora.engine.client import causal_or_cls_loss

    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = causal_or_cls_loss(binding.model, batch)
    loss.backward()
    optimizer.step()
    sync()
    return time.perf_counter() - start, float(loss.detach())


def measure(preset: str, steps: int, warmup: int, device: str, overrides: dict[str, str]) -> dict[str, Any]:
    from fedlora.configs import preset_path
    from fedlora.engine.config import load_config
    from fedlora.engine.setup import build_binding, device_for
    from fedlora.model.packing import flatten_padded
    from fedlora.tasks import build_task

    cfg = load_config(preset_path(preset), {"model.device": device, **overrides})
    dev = device_for(cfg.model.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    task = build_task(cfg.task.name, cfg.task.settings, seed=cfg.seed)
    train = task.load().train
    tokenizer, binding = build_binding(cfg, dev)
    if not binding.accepts_packed_sequences:
        raise RuntimeError(f"{cfg.model.name} does not keep packed sequences apart")
    params = binding.set_trainable()
    start_factors = [p.detach().clone() for p in params]
    states: dict[str, dict[str, Any]] = {}
    for form in ("pad", "flatten"):
        opt = torch.optim.AdamW(params, lr=cfg.train.lr)
        states[form] = {"params": [p.clone() for p in start_factors], "opt": copy.deepcopy(opt.state_dict())}
    order = list(range(len(train)))
    random.Random(cfg.seed).shuffle(order)
    size = cfg.train.batch_size
    times: dict[str, list[float]] = {"pad": [], "flatten": []}
    losses: dict[str, list[float]] = {"pad": [], "flatten": []}
    real_tokens: list[int] = []
    computed: dict[str, list[int]] = {"pad": [], "flatten": []}
    binding.model.train()
    for b in range(warmup + steps):
        padded = task.collate([train[i] for i in order[b * size : (b + 1) * size]], tokenizer)
        forms = {"pad": padded, "flatten": flatten_padded(padded)}
        for form, batch in forms.items():
            with torch.no_grad():  # this form's own adapter and optimizer state
                for p, saved in zip(params, states[form]["params"]):
                    p.copy_(saved)
            opt = torch.optim.AdamW(params, lr=cfg.train.lr)
            opt.load_state_dict(states[form]["opt"])
            seconds, loss = _step(binding, opt, {k: v.to(dev) for k, v in batch.items()}, sync)
            states[form] = {"params": [p.detach().clone() for p in params], "opt": copy.deepcopy(opt.state_dict())}
            if b >= warmup:
                times[form].append(seconds)
                losses[form].append(loss)
                computed[form].append(int(batch["input_ids"].numel()))
        if b >= warmup:
            real_tokens.append(int(padded["attention_mask"].sum()))
    useful = sum(real_tokens)
    out: dict[str, Any] = {
        "preset": preset,
        "task": cfg.task.name,
        "model": cfg.model.name,
        "device": str(dev),
        "attention": binding.model.config._attn_implementation,
        "batch_size": size,
        "steps": steps,
        "useful_tokens_per_step": useful / steps,
        "padded_share": 1 - useful / sum(computed["pad"]),
        "first_step_loss_gap": abs(losses["pad"][0] - losses["flatten"][0]) if steps else None,
    }
    for form in ("pad", "flatten"):
        total = sum(times[form])
        out[form] = {
            "seconds_per_step": total / steps,
            "median_seconds_per_step": statistics.median(times[form]),
            "useful_tokens_per_s": useful / total,
            "computed_tokens_per_step": sum(computed[form]) / steps,
            "mean_loss": sum(losses[form]) / steps,
        }
    out["speedup"] = out["pad"]["seconds_per_step"] / out["flatten"]["seconds_per_step"]
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["default", "instruction"])
    p.add_argument("--steps", type=int, default=12, help="timed optimizer steps per form")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    overrides = dict(s.split("=", 1) for s in args.set)
    rows = []
    header = ("preset", "pad%", "s/step pad", "s/step packed", "tok/s pad", "tok/s packed", "speedup")
    print("{:12s} {:>5s} {:>10s} {:>13s} {:>9s} {:>12s} {:>7s}".format(*header))
    for preset in args.presets:
        r = measure(preset, args.steps, args.warmup, args.device, overrides)
        rows.append(r)
        print(
            f"{preset:12s} {100 * r['padded_share']:5.1f} {r['pad']['seconds_per_step']:10.3f} "
            f"{r['flatten']['seconds_per_step']:13.3f} {r['pad']['useful_tokens_per_s']:9.0f} "
            f"{r['flatten']['useful_tokens_per_s']:12.0f} {r['speedup']:7.2f}x"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
