"""benchmarks/gpu.sh cannot rot: its CPU smoke mode runs every step (tests, aggregation, a round,
the memory model) at toy shapes and writes the JSON and the summary a GPU run writes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_gpu_script_smoke_mode_writes_every_result(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(tmp_path), "--smoke"],
        capture_output=True, text=True, timeout=900, env=env, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    log = (tmp_path / "log.txt").read_text()
    assert "FAILED" not in log, log
    agg = json.loads((tmp_path / "aggregation.json").read_text())
    assert agg["errors"] and all(v for k, v in agg["targets"].items() if "error" in k)  # exact in float32
    round_ = json.loads((tmp_path / "round-micro-nf4ckpt.json").read_text())
    assert round_["settings"]["quantization"] == "nf4" and round_["settings"]["gradient_checkpointing"]
    assert round_["summary"]["federated_tokens_per_s"] > 0
    memory = json.loads((tmp_path / "memory-micro-nf4ckpt.json").read_text())
    assert memory["measured"]["lora_params"] == memory["predicted"]["lora_params"]  # the formula's count
    packing = json.loads((tmp_path / "packing-auto.json").read_text())
    assert packing[0]["first_step_loss_gap"] < 1e-4 and packing[0]["flatten"]["useful_tokens_per_s"] > 0
    dp = json.loads((tmp_path / "dpsgd-micro-none.json").read_text())
    assert dp["plain"]["step_s"] > 0 and dp["dp"]["step_s"] > 0
    assert dp["dp"]["lora_params"] == dp["plain"]["lora_params"] > 0
    mom = json.loads((tmp_path / "momentum.json").read_text())
    assert set(mom["methods"]) == {"fedit", "ffa_lora", "flora", "fedex_lora", "fedmomentum"}
    assert all(r["observe_s"] > 0 for r in mom["methods"].values())
    par = json.loads((tmp_path / "backends-cpu-2.json").read_text())
    assert par["ray"]["steps"] == par["local"]["steps"] and len(par["ray"]["worker_rss_mib"]) == 2
    assert par["parallel_ceiling"] > 0 and par["local_narrow"]["steps"] == par["local"]["steps"]
    summary = (tmp_path / "summary.md").read_text()
    for needle in (
        "## Clients in parallel",
        "## Momentum diagnostics",
        "## DP-SGD",
        "## Aggregation",
        "round-micro-nf4ckpt",
        "memory-micro-nf4ckpt",
        "CUDA-only tests",
        "Padding-free",
        "Reload",
    ):
        assert needle in summary


def test_the_memory_formula_counts_lora_parameters_and_quantized_bytes():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import memory

    p = memory.predict("7b", quantization="nf4", rank=16, batch=4, seq=512, checkpointing=True)
    # LLaMA-2-7B, r=16 on all seven projections: 32 x 16 x (4 x 8192 + 2 x 15104 + 15104) = 39,976,960
    assert p["lora_params"] == 39_976_960
    assert p["lora_and_optimizer"] == 16 * 39_976_960
    n_lin = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert p["base_weights"] == pytest.approx(n_lin * (0.5 + 1 / 64 + 4 / 16384) + (2 * 32000 * 4096 + 65 * 4096) * 4)
    assert p["total"] < 10e9  # the target, predicted; gpu.sh measures it
    full = memory.predict("7b", quantization="none", rank=16, batch=4, seq=512, checkpointing=False)
    assert full["activations"] > 5 * p["activations"]  # what checkpointing saves
