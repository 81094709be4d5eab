"""One federated round against its limits: overhead outside local training, memory, throughput.

A randomly initialised LLaMA-architecture model built from a config (``--shape tiny`` for a CPU,
``1b`` = Llama-3.2-1B's shape, ``7b`` = Llama-2-7B's shape for a GPU; throughput does not depend
on the weight values) is trained on random tokens by the REAL simulation code path:
``fedlora.engine.local.local_run(cfg).run()`` with the task and model loaders swapped for the random ones
(``fedlora.tasks.build_task`` and ``fedlora.model.loading.load_model`` are patched; nothing else).
Timers wrap the runtime's own functions, so the split of a round is:

* **compute**: the clients' training loops (``train_local``'s forward/backward/clip/optimizer
  steps), without building their batches;
* **overhead**: everything else in the round, evaluation excluded: the method's client start and
  finish, swapping factors into the PEFT binding (``set_factors``/``get_factors``/``set_trainable``/
  extras), optimizer construction, batch building, screening the uploads, the method's
  aggregation and applying the backbone delta (merging); the checkpoint written after the round
  is reported beside it (it is outside ``_round`` and not in the issue's list).

Memory: the process peak (CPU: ``VmHWM``; CUDA: ``torch.cuda.max_memory_allocated``) of a
federated run with ``--clients`` clients against one plain PEFT training of the same model, each
in a fresh subprocess. Throughput: the same number of tokens (clients x steps x batch x
sequence) through one federated round and through one plain PEFT loop (``peft.get_peft_model``,
AdamW, the same clipping), in tokens/s and model-FLOP utilisation
``MFU = 6 * N * tokens/s / peak`` (N = parameters of the base model without the input embedding;
the 6N rule counts weight gradients that LoRA does not compute for frozen weights, so it is the
conventional, not the executed, FLOP count; attention's sequence-quadratic FLOPs are left out).
The peak is stated in the output (``--peak-tflops``; defaults: H100/H200 989 dense bf16,
A100 312; CPU: cores x clock x 32 fp32 FLOP/cycle for AVX2 with two FMA pipes, and a measured
sgemm peak beside it).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/round.py --device cpu --json benchmarks/round-cpu.json
    python benchmarks/round.py --device cuda --shape 1b --json benchmarks/round-h100-1b.json
    python benchmarks/round.py --device cuda --shape 7b --batch 4 --seq 512 --json benchmarks/round-h100-7b.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aggregation import _status_kib, machine_info, sync
from memory import SHAPES, random_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}


# ---- the random model and data ------------------------------------------------------------------
def base_params(model: torch.nn.Module) -> int:
    """Parameters of the base model without the input embedding (an lm_head tied to it counts once)."""
    emb = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is emb
    total = sum(p.numel() for p in model.parameters())
    return total if tied else total - emb.numel()


class RandomTokens:
    """A task of random token sequences (loss on every token); evaluation is a no-op."""

    name = "random_tokens"
    kind = "causal_lm"

    def __init__(self, n: int, seq: int, vocab: int, seed: int) -> None:
        self.n, self.seq, self.vocab, self.seed = n, seq, vocab, seed

    def load(self):
        from fedlora.tasks.base import TaskData

        g = torch.Generator().manual_seed(self.seed)
        ids = torch.randint(0, self.vocab, (self.n, self.seq), generator=g)
        train = [{"ids": ids[i], "category": str(i % 4)} for i in range(self.n)]
        return TaskData(train=train, test=train[:1], group_key="category")

    def collate(self, examples, tokenizer) -> dict[str, torch.Tensor]:
        ids = torch.stack([e["ids"] for e in examples])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def evaluate(self, model, tokenizer, examples) -> dict[str, float]:
        return {"none": 0.0}

    def protocol(self) -> dict[str, Any]:
        return {"task": self.name, "note": "benchmark: random tokens, no evaluation"}


# ---- timers around the runtime's own functions --------------------------------------------------
class Timers:
    """Seconds per label, reset each round; ``wrap`` replaces ``owner.attr`` with a timed version."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.now: dict[str, float] = {}
        self.depth = 0

    def wrap(self, owner: Any, attr: str, label: str) -> None:
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def timed(*a, **kw):
            if self.depth:  # nested in another timed call: counted there
                return fn(*a, **kw)
            self.depth += 1
            sync(self.device)
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                sync(self.device)
                self.now[label] = self.now.get(label, 0.0) + time.perf_counter() - t
                self.depth -= 1

        setattr(owner, attr, timed)

    def take(self) -> dict[str, float]:
        out, self.now = self.now, {}
        return out


def gpu_or_cpu_peak() -> dict[str, Any]:
    if torch.cuda.is_available():
        return {"peak_mib": torch.cuda.max_memory_allocated() / 2**20, "how": "torch.cuda.max_memory_allocated"}
    return {"peak_mib": (_status_kib("VmHWM") or 0) / 1024, "how": "VmHWM (process peak RSS)"}


def current_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated() / 2**20
    return (_status_kib("VmRSS") or 0) / 1024


# ---- the two measured modes (each in its own process) -------------------------------------------
def federated(args: argparse.Namespace) -> dict[str, Any]:
    """``--rounds`` rounds of ``--clients`` clients through ``local_run(cfg).run()``; per-round split."""
    import fedlora.engine.client as client_mod
    import fedlora.engine.rounds as runner
    import fedlora.engine.train as train_mod
    import fedlora.model.loading as loading
    import fedlora.tasks as tasks
    from fedlora.engine.config import config_from_dict
    from fedlora.engine.local import local_run
    from fedlora.methods import build_method
    from fedlora.model.binding import LoRABinding

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    n_examples = args.clients * args.steps * args.batch * (args.rounds + 1)
    built: dict[str, Any] = {}

    def fake_load_model(name, kind, *, dtype, num_labels=2, device="cpu", quantization="none", **_):
        model = random_llama(args.shape, dtype, device, args.seq, quantization)
        built["params"] = base_params(model)
        built["after_model_mib"] = current_mib(torch.device(device))
        return model

    tasks.build_task = lambda name, settings, seed=0: RandomTokens(
        n_examples, args.seq, SHAPES[args.shape]["vocab_size"], seed
    )
    loading.load_model = fake_load_model
    loading.load_tokenizer = lambda name: None

    timers = Timers(device)
    method_cls = type(build_method(args.method))
    for attr in ("client_start", "client_finish"):
        timers.wrap(method_cls, attr, f"method.{attr}")
    timers.wrap(method_cls, "aggregate", "aggregate")
    timers.wrap(method_cls, "finalize", "aggregate")
    for attr in ("set_factors", "get_factors", "set_trainable", "set_extras", "extras"):
        timers.wrap(LoRABinding, attr, "swap adapters")
    timers.wrap(LoRABinding, "apply_delta", "merge into backbone")
    timers.wrap(runner, "screen_uploads", "screen uploads")
    timers.wrap(train_mod, "make_optimizer", "optimizer setup")
    timers.wrap(client_mod.LocalData, "_batch", "batches")
    loops: list[float] = []
    real_train_local = client_mod.train_local

    def train_local(*a, **kw):
        result, state = real_train_local(*a, **kw)
        sync(device)
        loops.append(result.seconds)
        return result, state

    client_mod.train_local = train_local

    rounds: list[dict[str, Any]] = []
    real_round = runner.RoundEngine._round

    def timed_round(self, k, bar):
        loops.clear()
        timers.take()
        sync(device)
        t = time.perf_counter()
        record = real_round(self, k, bar)
        sync(device)
        wall = time.perf_counter() - t
        parts = timers.take()
        evals = float((record.get("seconds") or {}).get("eval", 0.0))
        batches = parts.get("batches", 0.0)
        compute = sum(loops) - batches
        rounds.append({"wall": wall, "eval": evals, "compute": compute, "parts": parts, "loops": list(loops)})
        return record

    runner.RoundEngine._round = timed_round
    checkpoints: list[float] = []
    real_checkpoint = runner.RoundEngine._checkpoint

    def timed_checkpoint(self, lines):
        t = time.perf_counter()
        real_checkpoint(self, lines)
        checkpoints.append(time.perf_counter() - t)

    runner.RoundEngine._checkpoint = timed_checkpoint

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config_from_dict(
            {
                "name": "bench",
                "output_dir": tmp,
                "seed": 0,
                "model": {
                    "name": f"random-llama-{args.shape}",
                    "kind": "causal_lm",
                    "dtype": args.dtype,
                    "device": args.device,
                    "quantization": args.quantization,
                },
                "lora": {"rank": args.rank, "alpha": 2 * args.rank, "targets": TARGETS},
                "method": {"name": args.method},
                "task": {"name": "random_tokens"},
                "partition": {"scheme": "iid", "num_clients": args.clients, "min_size": 1},
                # one round more than measured: the runtime evaluates the last round, which is dropped
                "rounds": {
                    "num_rounds": args.rounds + 1,
                    "clients_per_round": args.clients,
                    "eval_every": 0,
                    "eval_baseline": False,
                },
                "train": {
                    "optimizer": "adamw",
                    "lr": 1e-4,
                    "batch_size": args.batch,
                    "max_steps": args.steps,
                    "clip": 1.0,
                    "precision": args.precision,
                    "gradient_checkpointing": args.gradient_checkpointing,
                },
            }
        )
        local_run(cfg, progress=False).run()
    peak = gpu_or_cpu_peak()
    tokens = args.clients * args.steps * args.batch * args.seq
    measured = rounds[args.warmup : args.rounds]
    return {
        "mode": "federated",
        "params": built.get("params"),
        "after_model_mib": built.get("after_model_mib"),
        "tokens_per_round": tokens,
        "rounds": rounds,
        "measured_rounds": len(measured),
        "checkpoint_seconds": checkpoints,
        "peak": peak,
        "dtype": str(dtype),
    }


def plain(args: argparse.Namespace) -> dict[str, Any]:
    """Plain PEFT training of the same model on the same number of tokens as one round."""
    from peft import LoraConfig, get_peft_model

    from fedlora.engine.config import TrainConfig
    from fedlora.engine.train import autocast_dtype

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model = random_llama(args.shape, dtype, args.device, args.seq, args.quantization)
    params = base_params(model)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    after_model = current_mib(device)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    vocab = SHAPES[args.shape]["vocab_size"]
    g = torch.Generator().manual_seed(0)
    steps = args.clients * args.steps
    amp = autocast_dtype(TrainConfig(precision=args.precision), device)

    def run(n: int) -> float:
        trainable = [p for p in model.parameters() if p.requires_grad]
        sync(device)
        t = time.perf_counter()
        opt = torch.optim.AdamW(trainable, lr=1e-4)
        model.train()
        for _ in range(n):
            ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
            loss.backward()
            float(loss.detach())
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
        sync(device)
        return time.perf_counter() - t

    times = [run(steps) for _ in range(args.rounds)]
    return {
        "mode": "plain",
        "params": params,
        "after_model_mib": after_model,
        "tokens_per_run": steps * args.batch * args.seq,
        "seconds": times,
        "peak": gpu_or_cpu_peak(),
    }


# ---- peaks and the summary ----------------------------------------------------------------------
def cpu_peak_flops() -> dict[str, float]:
    """Nominal (cores x clock x 32 FLOP/cycle, AVX2 + 2 FMA pipes, fp32) and a measured sgemm peak."""
    mhz = 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                mhz = float(line.split(":")[1])
                break
    except OSError:
        pass
    cores = torch.get_num_threads()
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = float("inf")
    for _ in range(6):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return {"nominal": cores * mhz * 1e6 * 32, "sgemm": 2 * 2048**3 / best, "cores": cores, "mhz": mhz}


def summarise(fed: dict[str, Any], pl: dict[str, Any], args: argparse.Namespace, peak_flops: float) -> dict[str, Any]:
    measured = fed["rounds"][args.warmup : args.rounds]
    walls = [r["wall"] - r["eval"] for r in measured]
    computes = [r["compute"] for r in measured]
    overheads = [w - c for w, c in zip(walls, computes)]
    labels = sorted({k for r in measured for k in r["parts"]} - {"checkpoint"})
    parts = {k: statistics.median(r["parts"].get(k, 0.0) for r in measured) for k in labels}
    parts["other (untimed: records, seeding, train_local set-up)"] = statistics.median(
        (r["wall"] - r["eval"] - r["compute"]) - sum(v for k, v in r["parts"].items() if k != "checkpoint")
        for r in measured
    )
    ck = fed["checkpoint_seconds"][1 + args.warmup : 1 + args.rounds] or fed["checkpoint_seconds"]
    wall = statistics.median(walls)
    plain_s = statistics.median(pl["seconds"][args.warmup :] or pl["seconds"])
    tokens = fed["tokens_per_round"]
    n = fed["params"]
    fed_tps, plain_tps = tokens / wall, pl["tokens_per_run"] / plain_s
    return {
        "round_seconds_excl_eval": wall,
        "compute_seconds": statistics.median(computes),
        "overhead_seconds": statistics.median(overheads),
        "overhead_fraction": statistics.median(o / w for o, w in zip(overheads, walls)),
        "overhead_parts_seconds": parts,
        "checkpoint_seconds": statistics.median(ck) if ck else None,
        "overhead_fraction_with_checkpoint": (statistics.median(overheads) + (statistics.median(ck) if ck else 0))
        / (wall + (statistics.median(ck) if ck else 0)),
        "tokens_per_round": tokens,
        "federated_tokens_per_s": fed_tps,
        "plain_tokens_per_s": plain_tps,
        "federated_vs_plain_throughput": fed_tps / plain_tps,
        "params_without_embedding": n,
        "peak_flops": peak_flops,
        "mfu_federated": 6 * n * fed_tps / peak_flops,
        "mfu_plain": 6 * n * plain_tps / peak_flops,
        "peak_mib_federated": fed["peak"]["peak_mib"],
        "peak_mib_plain": pl["peak"]["peak_mib"],
        "peak_ratio": fed["peak"]["peak_mib"] / pl["peak"]["peak_mib"],
        "peak_above_model_ratio": (fed["peak"]["peak_mib"] - fed["after_model_mib"])
        / max(1e-9, pl["peak"]["peak_mib"] - pl["after_model_mib"]),
        "memory_measure": fed["peak"]["how"],
    }


def child(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """Run ``mode`` in a fresh interpreter (clean memory peaks); its JSON comes back on a file."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out = fh.name
    argv = [sys.executable, __file__, "--mode", mode, "--out", out]
    for key, value in vars(args).items():
        if key in ("mode", "out", "json") or value is None or value is False:
            continue
        flag = f"--{key.replace('_', '-')}"
        argv += [flag] if value is True else [flag, str(value)]
    subprocess.run(argv, check=True)
    data = json.loads(Path(out).read_text())
    Path(out).unlink()
    return data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--dtype", default=None, help="base weights (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--precision", default="auto", help="train.precision (auto: bf16 autocast on GPU)")
    p.add_argument("--quantization", choices=["none", "nf4", "fp4", "int8"], default="none", help="model.quantization")
    p.add_argument("--gradient-checkpointing", action="store_true", help="train.gradient_checkpointing")
    p.add_argument("--method", default="fedmomentum")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--steps", type=int, default=4, help="local steps per client per round")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="rounds (and plain repeats), the first --warmup not counted")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s of the device, in TFLOP/s")
    p.add_argument("--json", default=None)
    p.add_argument("--mode", choices=["all", "federated", "plain"], default="all", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.mode != "all":
        fn: Callable[[argparse.Namespace], dict[str, Any]] = federated if args.mode == "federated" else plain
        Path(args.out).write_text(json.dumps(fn(args)))
        return
    device = torch.device(args.device)
    load0 = os.getloadavg()
    t0 = time.time()
    pl = child(args, "plain")
    fed = child(args, "federated")
    flops: dict[str, Any] = {}
    if args.peak_tflops:
        peak, peak_how = args.peak_tflops * 1e12, "given (--peak-tflops)"
    elif device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        key = next((k for k in GPU_PEAK_TFLOPS if k in name), None)
        if key is None:
            raise SystemExit(f"unknown GPU {name!r}: pass --peak-tflops")
        peak, peak_how = GPU_PEAK_TFLOPS[key] * 1e12, f"{key} dense bf16 tensor-core peak"
    else:
        flops = cpu_peak_flops()
        peak = flops["nominal"]
        peak_how = f"{flops['cores']} cores x {flops['mhz']:.0f} MHz x 32 fp32 FLOP/cycle (AVX2, 2 FMA pipes)"
    s = summarise(fed, pl, args, peak)
    s["peak_flops_how"] = peak_how
    if flops:
        s["cpu_sgemm_flops"] = flops["sgemm"]
        s["mfu_federated_vs_sgemm"] = 6 * s["params_without_embedding"] * s["federated_tokens_per_s"] / flops["sgemm"]
        s["mfu_plain_vs_sgemm"] = 6 * s["params_without_embedding"] * s["plain_tokens_per_s"] / flops["sgemm"]
    result = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": machine_info(device),
        "loadavg_before": load0,
        "loadavg_after": os.getloadavg(),
        "wall_seconds": time.time() - t0,
        "settings": {k: v for k, v in vars(args).items() if k not in ("mode", "out", "json")},
        "summary": s,
        "federated": fed,
        "plain": pl,
    }
    print(report_text(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


def report_text(r: dict[str, Any]) -> str:
    s, a = r["summary"], r["settings"]
    lines = [
        f"{a['shape']} LLaMA ({s['params_without_embedding'] / 1e6:,.1f}M params w/o embedding), {a['method']}, "
        f"{a['clients']} clients x {a['steps']} steps x batch {a['batch']} x seq {a['seq']}, r={a['rank']}, "
        f"{a['device']} {a['dtype']}",
        f"round (eval excluded): {s['round_seconds_excl_eval']:.3f} s; compute {s['compute_seconds']:.3f} s; "
        f"overhead {s['overhead_seconds']:.3f} s = {100 * s['overhead_fraction']:.2f}% (target <= 5%)",
        "  overhead parts (s): " + ", ".join(f"{k} {v:.4f}" for k, v in s["overhead_parts_seconds"].items()),
        f"  checkpoint after the round: {s['checkpoint_seconds']:.3f} s "
        f"(overhead incl. checkpoint {100 * s['overhead_fraction_with_checkpoint']:.2f}%)",
        f"throughput: federated {s['federated_tokens_per_s']:,.0f} tok/s, plain PEFT {s['plain_tokens_per_s']:,.0f} "
        f"tok/s ({s['federated_vs_plain_throughput']:.3f}x)",
        f"MFU (6N, peak {s['peak_flops'] / 1e12:.3f} TFLOP/s: {s['peak_flops_how']}): federated "
        f"{100 * s['mfu_federated']:.1f}%, plain {100 * s['mfu_plain']:.1f}%",
        f"memory ({s['memory_measure']}): federated {a['clients']} clients {s['peak_mib_federated']:,.0f} MiB, "
        f"plain {s['peak_mib_plain']:,.0f} MiB ({s['peak_ratio']:.3f}x; above the model: "
        f"{s['peak_above_model_ratio']:.3f}x) (target <= 1.1x)",
        f"load average before/after: {r['loadavg_before']} / {r['loadavg_after']}",
    ]
    if "cpu_sgemm_flops" in s:
        lines.insert(
            6,
            f"  vs a measured sgemm peak ({s['cpu_sgemm_flops'] / 1e9:.0f} GFLOP/s): federated "
            f"{100 * s['mfu_federated_vs_sgemm']:.1f}%, plain {100 * s['mfu_plain_vs_sgemm']:.1f}%",
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
