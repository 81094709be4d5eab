"""The share of padding in fedlora's training batches, per shipped preset (issue #16, "no wasted
tokens"): the tokens a padded batch computes that carry no data.

For each preset, the task's own ``collate`` builds the training batches of ``train.batch_size``
examples, in the order one client would see them (the train examples in a seeded shuffle), and
``1 - sum(attention_mask) / numel(attention_mask)`` is the padded share: compute spent on pad
positions (right padding to the longest sequence of the batch). Tokenisation only: no model runs.

    python benchmarks/padding.py --json benchmarks/padding.json
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import random
from pathlib import Path
from typing import Any

PRESETS = ("default", "instruction", "commonsense", "code", "shakespeare", "glue_minilm")


def padded_share(preset: str, batches: int) -> dict[str, Any]:
    from fedlora.configs import preset_path
    from fedlora.engine.config import load_config
    from fedlora.model.loading import load_tokenizer
    from fedlora.tasks import build_task

    cfg = load_config(preset_path(preset))
    task = build_task(cfg.task.name, cfg.task.settings, seed=cfg.seed)
    train = task.load().train
    tokenizer = load_tokenizer(cfg.model.name)
    order = list(range(len(train)))
    random.Random(cfg.seed).shuffle(order)
    size = cfg.train.batch_size
    real = total = 0
    longest = []
    for b in range(min(batches, len(order) // size)):
        batch = task.collate([train[i] for i in order[b * size : (b + 1) * size]], tokenizer)
        mask = batch["attention_mask"]
        real += int(mask.sum())
        total += mask.numel()
        longest.append(int(mask.shape[1]))
    return {
        "preset": preset,
        "task": cfg.task.name,
        "batch_size": size,
        "batches": len(longest),
        "padded_share": 1 - real / total if total else None,
        "mean_batch_width": sum(longest) / len(longest) if longest else None,
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=list(PRESETS))
    p.add_argument("--batches", type=int, default=50, help="batches per preset")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rows = []
    print(f"{'preset':14s} {'task':14s} {'batch':>5s} {'batches':>7s} {'padded':>7s} {'width':>6s}")
    for preset in args.presets:
        try:
            r = padded_share(preset, args.batches)
        except Exception as exc:  # a preset whose data is not installed here
            print(f"{preset:14s} skipped: {type(exc).__name__}: {exc}"[:160])
            continue
        rows.append(r)
        print(
            f"{preset:14s} {r['task']:14s} {r['batch_size']:5d} {r['batches']:7d} "
            f"{100 * r['padded_share']:6.1f}% {r['mean_batch_width']:6.0f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
