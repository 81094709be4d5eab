"""``engine.backend`` local against ray: wall time of the clients' training per round, start-up
cost and memory per worker, on one machine.

Runs the same config twice through ``fedlora.engine.local.local_run`` (the code ``fedlora run``
runs): once with the local backend, once with ``engine.backend=ray`` and ``--workers`` workers
(``cpus_per_worker = cores / workers``), and reads each round's ``seconds.train`` from
``metrics.jsonl`` (the time the engine waits for the round's uploads; evaluation and aggregation
are the server's and the same for both). The first round is reported apart (warm-up). Start-up:
from ``RoundEngine.run`` to the first round, Ray's start and workers' model loading included.
Memory per worker: the resident set of each worker process at the end of the last round.

    python benchmarks/backends.py --preset ci --workers 2 --json benchmarks/backends-cpu.json
    python benchmarks/backends.py --preset ci --tiny-shape /tmp/tiny-llama --workers 2
    python benchmarks/backends.py --preset ci --workers 2 --gpus-per-worker 0.5 --set model.device=cuda

``--ceiling`` adds a third run, local on ``cores / workers`` threads: ``workers`` clients at a time on
that many threads each can at best train a round ``workers x (local time) / (narrow time)`` faster
(perfect parallelism, no contention), the most any scheduler of whole clients reaches on the machine.

``--tiny-shape FOLDER`` first saves a random LLaMA of ``benchmarks/memory.py``'s ``tiny`` shape
(the shape of ``benchmarks/round.py``: 6 layers, hidden 512, 27M parameters) into FOLDER, with a
byte-level BPE tokenizer of up to its 8192-token vocabulary trained on the preset task's training
texts, and runs the preset on it.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def run(preset: str, sets: dict[str, str], out: Path, name: str, threads: int | None = None) -> dict[str, Any]:
    """One run through ``local_run``; ``threads`` sets torch's intra-op threads of this process for it."""
    from fedlora.configs import preset_path
    from fedlora.engine.config import load_config
    from fedlora.engine.local import local_run
    from fedlora.engine.ray_runtime import RayTrainer

    cfg = load_config(preset_path(preset), {**sets, "output_dir": str(out), "name": name})
    engine = local_run(cfg, progress=False)
    worker_mib: list[float] = []
    if isinstance(engine.trainer, RayTrainer):
        real_close = engine.trainer.close

        def close_after_measuring() -> None:
            import psutil
            import ray

            for w in engine.trainer.workers:
                pid = ray.get(w.pid.remote())
                worker_mib.append(psutil.Process(pid).memory_info().rss / 2**20)
            real_close()

        engine.trainer.close = close_after_measuring  # type: ignore[method-assign]
    t0 = time.perf_counter()
    first: list[float] = []
    real_round = type(engine)._round

    def timed_round(self, k, bar):  # type: ignore[no-untyped-def]
        if not first:
            first.append(time.perf_counter() - t0)
        return real_round(self, k, bar)

    engine._round = timed_round.__get__(engine)  # type: ignore[method-assign]
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        engine.run()
    finally:
        torch.set_num_threads(before)
    wall = time.perf_counter() - t0
    lines = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    train = [r["seconds"]["train"] for r in lines if r.get("phase") == "train"]
    steps = [sum(s["steps"] for s in r["train"].values()) for r in lines if r.get("phase") == "train"]
    return {
        "train_seconds": train,
        "median_train_seconds": statistics.median(train[1:] or train),  # round 1 is the warm-up
        "steps": steps,
        "startup_seconds": first[0] if first else None,
        "wall_seconds": wall,
        "worker_rss_mib": worker_mib,
        "records": [{k: v for k, v in r.items() if k not in ("seconds", "eval_seconds", "train")} for r in lines],
        "losses": [s["loss"] for r in lines if r.get("phase") == "train" for s in r["train"].values()],
    }


def save_tiny_shape(preset: str, folder: Path) -> Path:
    """A random LLaMA of the ``tiny`` shape and a BPE tokenizer trained on ``preset``'s task texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from fedlora.configs import preset_path
    from fedlora.engine.config import load_config
    from fedlora.tasks import build_task
    from memory import SHAPES

    cfg = load_config(preset_path(preset))
    train = build_task(cfg.task.name, cfg.task.settings, seed=cfg.seed).load().train
    texts = [" ".join(str(v) for v in ex.values() if isinstance(v, str)) for ex in train]
    shape = dict(SHAPES["tiny"])
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=shape["vocab_size"],
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<eos>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(**shape, max_position_embeddings=1024, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    )
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="ci")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cores", type=int, default=os.cpu_count() or 2, help="cores the workers share (threads each)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="engine.gpus_per_worker (0.5: two workers a GPU)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--tiny-shape", default=None, metavar="FOLDER", help="save and run the tiny LLaMA shape")
    p.add_argument(
        "--ceiling",
        action="store_true",
        help="also run local on cores/workers threads: the speed-up a perfect parallel run could reach",
    )
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    sets = dict(s.split("=", 1) for s in args.set)
    if args.tiny_shape:
        sets["model.name"] = str(save_tiny_shape(args.preset, Path(args.tiny_shape)))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        local = run(args.preset, sets, out, "local")
        ray_sets = {
            **sets,
            "engine.backend": "ray",
            "engine.workers": str(args.workers),
            "engine.cpus_per_worker": str(args.cores / args.workers),
            "engine.gpus_per_worker": str(args.gpus_per_worker),
        }
        par = run(args.preset, ray_sets, out, "ray")
        narrow_threads = max(1, args.cores // args.workers)
        narrow = run(args.preset, sets, out, "narrow", threads=narrow_threads) if args.ceiling else None
    same = local["records"] == par["records"]
    loss_diff = max((abs(a - b) / abs(a) for a, b in zip(local["losses"], par["losses"])), default=0.0)
    lt, rt = local["median_train_seconds"], par["median_train_seconds"]
    result = {
        "settings": vars(args),
        "local": {k: v for k, v in local.items() if k != "records"},
        "ray": {k: v for k, v in par.items() if k != "records"},
        "records_identical": same,
        "max_relative_loss_difference": loss_diff,
        "train_speedup_after_round_1": lt / rt,
    }
    if narrow is not None:
        # W workers on cores/W threads each can at best train W clients in the time local takes to
        # train one on cores/W threads alone: W x (time on all cores) / (time on cores/W threads).
        nt = narrow["median_train_seconds"]
        result["local_narrow"] = {k: v for k, v in narrow.items() if k != "records"}
        result["parallel_ceiling"] = args.workers * lt / nt
    print(f"{args.preset} {' '.join(args.set)}: {args.workers} ray workers on {args.cores} cores")
    print(f"  client training per round (median after round 1): local {lt:.1f} s, ray {rt:.1f} s -> {lt / rt:.2f}x")
    print(f"  round 1: local {local['train_seconds'][0]:.1f} s, ray {par['train_seconds'][0]:.1f} s")
    print(f"  start-up to round 1: local {local['startup_seconds']:.1f} s, ray {par['startup_seconds']:.1f} s")
    print(f"  worker RSS: {', '.join(f'{m:.0f} MiB' for m in par['worker_rss_mib'])}")
    print(f"  records identical: {same}; largest relative difference of a client's loss: {loss_diff:.1e}")
    if narrow is not None:
        print(
            f"  local on {narrow_threads} thread(s): {nt:.1f} s per round -> a perfect parallel run"
            f" reaches {result['parallel_ceiling']:.2f}x"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
