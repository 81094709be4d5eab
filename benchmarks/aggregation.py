"""FedMomentum aggregation on a LLaMA-2-7B-shaped adapter set: fedlora's exact factored route
versus the dense SVD and the randomized SVD of the dense aggregate.

The adapter set: ``--layers`` x {q, k, v, o: 4096 x 4096; gate, up: 11008 x 4096; down: 4096 x 11008}
(d_out x d_in), rank ``--rank``, ``--clients`` clients with random sample counts. Client factors
are global factors with a decaying spectrum plus per-client perturbations, so the aggregate
``M = sum_i p_i B_i A_i`` has a realistic spectrum: r strong components, a first-order band of
client disagreement and a small second-order tail (rank(M) <= n r).

Routes:

1. ``fedlora``: ``build_method("fedmomentum").aggregate(state, uploads)`` on the whole set (exact
   Householder QR of the stacked factors + small SVD; singular vectors formed only for the kept
   components; parallel over modules on CPU, batched per shape on GPU); also with ``tau=1`` (every
   component kept: the most vectors to form), the factor stacking, the bare ``lowrank_svd_many``
   call (all vectors) and ``implicit_svd_many`` (singular values only), timed separately;
2. ``dense``: form ``M`` densely and take ``torch.linalg.svd``; too slow for the whole set on a small
   CPU, so timed on ``--dense-modules`` modules per shape and extrapolated to the full set;
3. ``rsvd``: ``torch.svd_lowrank(M, q=n*r, niter)`` on the dense ``M`` (the third-party/paper
   route), on the same subset, extrapolated the same way.

Accuracy, on ``--error-modules`` modules per shape, against the float64 dense SVD of ``M``:
relative Frobenius error of the rank-r LoRA product and of the full reconstruction, and the
largest relative error of the top-r singular values.

Timings are medians over ``--repeats`` runs after ``--warmup`` runs (CUDA: synchronised).
Peak memory is the extra resident memory during one run (Linux VmHWM reset through
``/proc/self/clear_refs``, else RSS sampling) on CPU, ``torch.cuda.max_memory_allocated`` above the
starting allocation on CUDA.

    python benchmarks/aggregation.py --device cpu --json benchmarks/results-cpu.json
    python benchmarks/aggregation.py --device cuda --json benchmarks/results-h100.json
"""

from __future__ import annotations

import os

# Before torch starts its OpenMP pool: idle threads must not spin between calls on small CPUs.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import ctypes
import gc
import json
import math
import platform
import resource
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from fedlora.lowrank import lowrank_svd_many
from fedlora.methods import ClientUpload, GlobalState, LoRASpec, ModuleFactors, build_method
from fedlora.methods.base import aggregation_weights, stacked_products

try:  # absent before the implicit-vector SVD (lets this script time older checkouts)
    from fedlora.lowrank import implicit_svd_many
except ImportError:
    implicit_svd_many = None

HIDDEN, INTERMEDIATE = 4096, 11008


def projections(hidden: int, intermediate: int) -> tuple[tuple[str, int, int], ...]:
    """One LLaMA decoder layer's adapted projections: ``(name, d_out, d_in)``."""
    return (
        ("self_attn.q_proj", hidden, hidden),
        ("self_attn.k_proj", hidden, hidden),
        ("self_attn.v_proj", hidden, hidden),
        ("self_attn.o_proj", hidden, hidden),
        ("mlp.gate_proj", intermediate, hidden),
        ("mlp.up_proj", intermediate, hidden),
        ("mlp.down_proj", hidden, intermediate),
    )


# (name, d_out, d_in) of the adapted projections of one LLaMA-2-7B decoder layer.
PROJECTIONS = projections(HIDDEN, INTERMEDIATE)

TARGET_REL_ERR = 1e-5
TARGET_CPU_S = 5.0
TARGET_GPU_S = 0.2
TARGET_SPEEDUP = 500.0


# ---- data ----------------------------------------------------------------------------------
def build_round(layers: int, clients: int, rank: int, device: torch.device, seed: int, eps: float, decay: float):
    """The global state and the clients' uploads of one round (float32 factors on ``device``).

    Global factors ``B0 = G_B diag(sqrt(sigma))``, ``A0 = diag(sqrt(sigma)) G_A`` with Gaussian
    ``G`` scaled to unit column/row norms and ``sigma_j = decay**j``; client ``i`` uploads
    ``B0 + eps E_i``, ``A0 + eps F_i`` (independent unit-scale Gaussian perturbations)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    counts = torch.randint(100, 1001, (clients,), generator=torch.Generator().manual_seed(seed)).tolist()
    root = torch.tensor([decay**j for j in range(rank)], device=device).sqrt()
    glob: dict[str, ModuleFactors] = {}
    per_client: list[dict[str, ModuleFactors]] = [{} for _ in range(clients)]
    for layer in range(layers):
        for proj, d_out, d_in in PROJECTIONS:
            name = f"model.layers.{layer}.{proj}"
            B0 = torch.randn(d_out, rank, generator=gen, device=device) * (root / math.sqrt(d_out))
            A0 = torch.randn(rank, d_in, generator=gen, device=device) * (root[:, None] / math.sqrt(d_in))
            glob[name] = ModuleFactors(A=A0, B=B0)
            for c in range(clients):
                B = B0 + torch.randn(d_out, rank, generator=gen, device=device) * (eps / math.sqrt(d_out))
                A = A0 + torch.randn(rank, d_in, generator=gen, device=device) * (eps / math.sqrt(d_in))
                per_client[c][name] = ModuleFactors(A=A, B=B)
    state = GlobalState(round=0, factors=glob, spec=LoRASpec(rank=rank, alpha=2.0 * rank))
    uploads = [ClientUpload(f"client{c}", per_client[c], counts[c]) for c in range(clients)]
    return state, uploads


def shape_of(state: GlobalState, name: str) -> tuple[int, int]:
    f = state.factors[name]
    return int(f.B.shape[0]), int(f.A.shape[1])


def modules_by_shape(state: GlobalState) -> dict[tuple[int, int], list[str]]:
    out: dict[tuple[int, int], list[str]] = {}
    for name in state.factors:
        out.setdefault(shape_of(state, name), []).append(name)
    return out


# ---- timing and memory -----------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy jiffies of the whole machine, jiffies of this process), or None off Linux."""
    try:
        with open("/proc/stat") as fh:
            vals = [int(x) for x in fh.readline().split()[1:]]
        with open("/proc/self/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    return sum(vals) - vals[3] - vals[4], int(fields[11]) + int(fields[12])


class CPULoad:
    """CPU cores this process and every other process kept busy during a block (Linux): other
    processes on a shared machine slow multi-threaded LAPACK down a lot, so runs record it."""

    def __enter__(self) -> CPULoad:
        self.t0, self.j0 = time.perf_counter(), _cpu_jiffies()
        return self

    def __exit__(self, *exc: object) -> None:
        dt, j1 = time.perf_counter() - self.t0, _cpu_jiffies()
        self.own = self.others = None
        if self.j0 is not None and j1 is not None and dt > 0:
            hz = os.sysconf("SC_CLK_TCK")
            self.own = (j1[1] - self.j0[1]) / hz / dt
            self.others = max(0.0, ((j1[0] - self.j0[0]) - (j1[1] - self.j0[1])) / hz / dt)


def time_runs(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> dict[str, Any]:
    """Wall seconds of ``repeats`` calls after ``warmup`` calls (results dropped at once), with the
    CPU load of this and of other processes during the timed calls."""
    for _ in range(warmup):
        fn()
        sync(device)
    times, own, others = [], [], []
    for _ in range(repeats):
        sync(device)
        with CPULoad() as load:
            t0 = time.perf_counter()
            out = fn()
            sync(device)
            times.append(time.perf_counter() - t0)
        del out
        if load.own is not None:
            own.append(load.own)
            others.append(load.others)
    return {
        "times_s": times,
        "median_s": statistics.median(times),
        "own_cores": statistics.mean(own) if own else None,
        "other_cores_max": max(others) if others else None,
    }


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc keeps large freed blocks after the first few),
    so that the resident size before a run counts live memory only."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class _RSSSampler:
    """Fallback peak-RSS probe: polls the resident size from a thread."""

    def __init__(self, interval: float = 0.002) -> None:
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> _RSSSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def peak_memory(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float, str, float]:
    """Run ``fn`` once; return its result, the peak extra memory in MiB, how that was measured and
    the wall seconds of the call."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        dt = time.perf_counter() - t0
        return out, (torch.cuda.max_memory_allocated(device) - base) / 2**20, "cuda.max_memory_allocated", dt
    _trim_heap()
    if _reset_hwm() and _status_kib("VmHWM") is not None:
        base = _status_kib("VmRSS") or 0
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        return out, ((_status_kib("VmHWM") or 0) - base) / 1024, "VmHWM (clear_refs reset)", dt
    try:
        sampler = _RSSSampler()
    except ImportError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return out, (after - before) / 1024, "ru_maxrss delta (lower bound)", dt
    base = sampler.proc.memory_info().rss
    with sampler:
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
    return out, (sampler.peak - base) / 2**20, "RSS sampling", dt


# ---- routes ----------------------------------------------------------------------------------
def dense_svd(P: torch.Tensor, Q: torch.Tensor, k: int):
    M = P @ Q
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, :k].clone(), S[:k].clone(), Vh[:k].clone()


def randomized_svd(P: torch.Tensor, Q: torch.Tensor, k: int, niter: int):
    M = P @ Q
    U, S, V = torch.svd_lowrank(M, q=k, niter=niter)
    return U, S, V.mT


def rel_fro(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(x - ref) / torch.linalg.matrix_norm(ref))


def product(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> torch.Tensor:
    return (U.double() * S.double()) @ Vh.double()


# ---- reporting -------------------------------------------------------------------------------
def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
    }
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 100 else f"{x:.0f}"


def fmt_e(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each route (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    ap.add_argument("--dense-modules", type=int, default=1, help="modules per shape timed on the dense routes")
    ap.add_argument("--dense-repeats", type=int, help="timed runs of the dense SVD (default: 1 on CPU, else --repeats)")
    ap.add_argument("--error-modules", type=int, default=1, help="modules per shape checked against float64")
    ap.add_argument("--niter", type=int, nargs="*", default=[0, 2], help="power iterations of svd_lowrank")
    ap.add_argument("--eps", type=float, default=0.45, help="client perturbation size (relative to the global)")
    ap.add_argument("--decay", type=float, default=0.85, help="spectrum decay of the global factors")
    ap.add_argument(
        "--worst-case",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time aggregate with tau=1 (every singular vector formed)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=HIDDEN, help="hidden size (default: LLaMA-2-7B's)")
    ap.add_argument("--intermediate", type=int, default=INTERMEDIATE, help="MLP width (default: LLaMA-2-7B's)")
    ap.add_argument("--profile", action="store_true", help="also print a torch.profiler breakdown of one aggregate")
    ap.add_argument("--json", metavar="OUT", help="write machine-readable results here")
    args = ap.parse_args(argv)
    global PROJECTIONS
    PROJECTIONS = projections(args.hidden, args.intermediate)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    dense_repeats = args.dense_repeats or (1 if device.type == "cpu" else args.repeats)
    torch.manual_seed(args.seed)
    n, r = args.clients, args.rank
    k = n * r

    info = machine_info(device)
    gpu = f", {info['gpu']}" if "gpu" in info else ""
    print(
        f"# {info.get('cpu_model', '?')} x{info['cpu_count']}, torch {info['torch']} "
        f"({info['torch_threads']} threads){gpu}"
    )
    t0 = time.perf_counter()
    state, uploads = build_round(args.layers, n, r, device, args.seed, args.eps, args.decay)
    sync(device)
    groups = modules_by_shape(state)
    upload_mib = sum(u.nbytes() for u in uploads) / 2**20
    print(
        f"# {len(state.factors)} modules, {n} clients, rank {r}: uploads {upload_mib:.0f} MiB, "
        f"built in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )

    method = build_method("fedmomentum")
    p = aggregation_weights(uploads)
    routes: dict[str, dict[str, Any]] = {}
    results: dict[str, Any] = {
        "machine": info,
        "args": vars(args),
        "modules": len(state.factors),
        "shapes": {f"{d_out}x{d_in}": len(names) for (d_out, d_in), names in groups.items()},
        "upload_mib": upload_mib,
        "routes": routes,
    }
    err_names = [m for names in groups.values() for m in names[: args.error_modules]]
    outputs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (route, module) -> factors, for errors

    def whole_set(name: str, fn: Callable[[], Any], **extra: Any) -> Any:
        print(f"# {name} ...", flush=True)
        timing = time_runs(fn, device, args.warmup, args.repeats)
        out, mib, how, _ = peak_memory(fn, device)
        routes[name] = {**timing, "peak_mib": mib, "peak_how": how, "measured": "whole set", **extra}
        return out

    # -- 1. fedlora ------------------------------------------------------------------------------
    res = whole_set("fedlora.aggregate", lambda: method.aggregate(state, uploads))
    r_eff = sorted(v["r_eff"] for v in res.report.values())
    routes["fedlora.aggregate"]["r_eff"] = {"min": r_eff[0], "median": statistics.median(r_eff), "max": r_eff[-1]}
    for m in err_names:
        f, delta = res.state.factors[m], res.backbone_delta[m]
        up, down = delta.factors()
        outputs[("fedlora.aggregate", m)] = {"B": f.B, "A": f.A, "res_up": up, "res_down": down}
    del res
    if args.worst_case:
        exact = build_method("fedmomentum", {"tau": 1.0})
        whole_set("fedlora.aggregate(tau=1)", lambda: exact.aggregate(state, uploads))

    def stack_all():
        return {m: stacked_products(uploads, m, p) for m in state.factors}

    pairs = whole_set("fedlora.stack", stack_all)
    svds = whole_set("fedlora.lowrank_svd_many", lambda: lowrank_svd_many(pairs))
    for m in err_names:
        outputs[("fedlora.lowrank_svd_many", m)] = {"U": svds[m].U, "S": svds[m].S, "Vh": svds[m].Vh}
    del svds
    if implicit_svd_many is not None:
        whole_set("fedlora.implicit_svd_many", lambda: implicit_svd_many(pairs), note="singular values only")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            method.aggregate(state, uploads)
            sync(device)
        sort = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        results["profile"] = prof.key_averages().table(sort_by=sort, row_limit=15)
        print(results["profile"])

    # -- 2./3. dense routes on a subset, extrapolated to the whole set --------------------------
    dense_routes: list[tuple[str, Callable]] = [("dense.svd", lambda P, Q: dense_svd(P, Q, k))]
    for it in args.niter:
        dense_routes.append((f"rsvd.niter{it}", lambda P, Q, it=it: randomized_svd(P, Q, k, it)))
    for route, fn in dense_routes if args.dense_modules > 0 else []:
        print(f"# {route}: {args.dense_modules} module(s) per shape ...", flush=True)
        reps = dense_repeats if route == "dense.svd" else args.repeats
        warm = 0 if (route == "dense.svd" and device.type == "cpu") else args.warmup
        per_shape, total, mem, others, own = {}, 0.0, 0.0, [], []
        for (d_out, d_in), names in groups.items():
            times = []
            for m in names[: args.dense_modules]:
                P, Q = pairs[m]
                run = lambda P=P, Q=Q, fn=fn: fn(P, Q)  # noqa: E731
                # The memory run doubles as the first timed run when there is no warm-up (the
                # dense SVD on CPU: tens of seconds a call).
                with CPULoad() as load:
                    (U, S, Vh), mib, how, dt = peak_memory(run, device)
                mem = max(mem, mib)
                if m in err_names:
                    outputs[(route, m)] = {"U": U, "S": S, "Vh": Vh}
                del U, S, Vh
                first = [] if warm else [dt]
                times += first
                if load.others is not None and first:
                    others.append(load.others)
                    own.append(load.own or 0.0)
                if reps > len(first):
                    timing = time_runs(run, device, max(0, warm - 1), reps - len(first))
                    times += timing["times_s"]
                    others.append(timing["other_cores_max"] or 0.0)
                    own.append(timing["own_cores"] or 0.0)
            med = statistics.median(times)
            per_shape[f"{d_out}x{d_in}"] = {"median_s": med, "times_s": times, "modules": len(names)}
            total += med * len(names)
        routes[route] = {
            "median_s": total,
            "per_shape": per_shape,
            "peak_mib": mem,
            "peak_how": how + ", one module",
            "own_cores": statistics.mean(own) if own else None,
            "other_cores_max": max(others) if others else None,
            "measured": f"extrapolated from {args.dense_modules} module(s)/shape",
        }

    # -- accuracy against the float64 dense SVD -----------------------------------------------
    errors: dict[str, dict[str, dict[str, float]]] = {}
    if err_names:
        print(f"# float64 dense SVD reference on {len(err_names)} module(s) ...", flush=True)
    scale = state.spec.scale()
    for m in err_names:
        P, Q = pairs[m]
        M64 = P.double() @ Q.double()
        U64, S64, Vh64 = torch.linalg.svd(M64, full_matrices=False)
        ref_r = product(U64[:, :r], S64[:r], Vh64[:r])
        for (route, mod), o in outputs.items():
            if mod != m:
                continue
            if route == "fedlora.aggregate":
                B, A = o["B"].double(), o["A"].double()
                lora = B @ A
                s_r = B.norm(dim=0) * A.norm(dim=1)  # balanced split: s_j = |B_j| |A_j|
                keep = r + o["res_up"].shape[1]
                res_up, res_down = o["res_up"].to(lora), o["res_down"].to(lora)  # empty band: CPU zeros
                kept = lora + res_up @ res_down / scale
                recon = rel_fro(kept, product(U64[:, :keep], S64[:keep], Vh64[:keep]))
            else:
                U, S, Vh = o["U"], o["S"], o["Vh"]
                lora, s_r = product(U[:, :r], S[:r], Vh[:r]), S[:r].double()
                recon = rel_fro(product(U, S, Vh), M64)
            e = {
                "lora_product": rel_fro(lora, ref_r),
                "top_r_singular_values": float(((s_r - S64[:r]).abs() / S64[:r]).max()),
                "reconstruction": recon,
            }
            for key, val in e.items():
                errors.setdefault(route, {}).setdefault(key, {})[m] = val
        del M64, U64, Vh64, ref_r
    results["errors"] = {route: {key: max(v.values()) for key, v in by.items()} for route, by in errors.items()}
    results["errors_per_module"] = errors

    # -- summary ---------------------------------------------------------------------------------
    base = routes["fedlora.aggregate"]["median_s"]
    for route in routes.values():
        route["vs_aggregate"] = route["median_s"] / base
    header = (
        f"{'route':<28} {'time (s)':>9} {'x aggr.':>8} {'peak MiB':>9} {'LoRA err':>9} {'s_1..r err':>10} "
        f"{'recon err':>9} {'others':>6}  how"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for name, route in routes.items():
        err = results["errors"].get(name, {})
        others = route.get("other_cores_max")
        print(
            f"{name:<28} {fmt_s(route['median_s']):>9} {route['vs_aggregate']:>8.2f} "
            f"{route.get('peak_mib', float('nan')):>9.0f} {fmt_e(err.get('lora_product')):>9} "
            f"{fmt_e(err.get('top_r_singular_values')):>10} {fmt_e(err.get('reconstruction')):>9} "
            f"{'-' if others is None else f'{others:.2f}':>6}  {route['measured']}"
        )
    print(
        "(time: median wall seconds for the whole set; x aggr.: time / fedlora.aggregate; peak MiB: "
        f"{routes['fedlora.aggregate']['peak_how']}; others: most CPU cores other processes kept busy during a "
        f"timed run; r_eff over modules: {routes['fedlora.aggregate']['r_eff']})"
    )

    target_s = TARGET_GPU_S if device.type == "cuda" else TARGET_CPU_S
    agg_err = results["errors"].get("fedlora.aggregate", {})
    worst = max(agg_err.values()) if agg_err else None
    targets: dict[str, Any] = {
        f"whole set <= {target_s:g} s on {device.type} (got {base:.2f} s)": base <= target_s,
        f"relative error <= {TARGET_REL_ERR:g} in float32 (got {fmt_e(worst)})": (
            None if worst is None else worst <= TARGET_REL_ERR
        ),
    }
    if "dense.svd" in routes:
        speedup = routes["dense.svd"]["median_s"] / base
        targets[f">= {TARGET_SPEEDUP:g}x faster than dense SVD (got {speedup:.0f}x)"] = speedup >= TARGET_SPEEDUP
    results["targets"] = targets
    print()
    for what, ok in targets.items():
        print(f"target {what}: {'n/a' if ok is None else ('met' if ok else 'MISSED')}")
    if "dense.svd" in routes:
        print(f"(dense and rsvd routes: {routes['dense.svd']['measured']}, times extrapolated to all modules)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2, default=str)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
