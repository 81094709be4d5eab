"""Device memory of one client's local training: a formula, and a measurement to check it.

fedlora trains one client at a time on one copy of the base model, so the device holds one
client's training whatever the number of clients (uploads wait on the host; see ``round.py``).
That memory is, in bytes (``c`` = compute bytes per element, 2 for bf16 autocast/compute, 4 in
float32; ``b`` batch, ``s`` sequence, ``h`` hidden, ``i`` MLP width, ``kv`` key/value width,
``L`` layers, ``V`` vocabulary, ``a`` attention heads):

* **base weights**: the decoder's linear weights ``N_lin`` at 2 (bf16) / 4 (fp32) bytes, or
  4-bit: ``0.5 + 1/64 + 4/16384`` bytes per weight (NF4/FP4 codes, double-quantized absmax per
  64-block, fp32 second-level absmax per 256 blocks), or int8: 1 byte + a float32 scale per
  output row. PEFT's ``prepare_model_for_kbit_training`` keeps the embeddings, the LM head and
  the norms of a quantized base in float32 (4 bytes each), a cost of its own on large vocabularies;
* **LoRA + optimizer**: ``P = r * sum(d_in + d_out)`` over adapted layers, float32 weights,
  gradients and AdamW's two moments: ``16 P``;
* **activations** saved for the backward pass, per decoder layer: two RMSNorms
  ``2 (4 + c) bsh``; RoPE'd q and k, v and the attention output ``c bs (2h + 2kv)``; the SwiGLU
  MLP's gate, SiLU, up and product ``4 c bsi``; the math attention path (CPU) also keeps the
  ``a s^2`` scores and probabilities ``2 c b a s^2`` (GPU kernels keep only a log-sum-exp).
  Without checkpointing all ``L`` layers; with it, each layer's input (``r_b bsh``, the residual
  stream's bytes) plus one layer recomputed during the backward;
* **logits and loss**: ``3 * 4 bsV`` (the float32 logits, their log-softmax and gradient);
* **side path** of backbone deltas, when used: ``4 (d_in + d_out) k`` per layer;
* **4-bit workspace**: one weight dequantized for its matmul, ``c * max(d_in d_out)``.

The measurement builds a random LLaMA of the shape (``--quantization`` swaps its decoder linears
for bitsandbytes layers), wraps LoRA on all linear layers with PEFT, and runs AdamW steps, with
``--gradient-checkpointing`` as ``train.gradient_checkpointing`` does. On CUDA each component is
``torch.cuda.memory_allocated`` between phases and the activations are the step's peak above
them; on the CPU the same phases read the process's resident set (``VmRSS``; peak ``VmHWM``)
with glibc's mmap threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``, set by re-executing),
so a freed tensor leaves the resident set at once: the same split, within the allocator's slack.

    python benchmarks/memory.py --predict                      # the formula's table, 1B/7B/8B/13B
    python benchmarks/memory.py --device cpu --shape tiny --quantization nf4 --json m.json
    python benchmarks/memory.py --device cuda --shape 7b --quantization nf4 --rank 16 --seq 512 \\
        --batch 4 --gradient-checkpointing --json m-7b.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aggregation import _status_kib

MIB = 2**20
SHAPES: dict[str, dict[str, Any]] = {
    "micro": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=1024),
    "tiny": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
                 num_key_value_heads=8, vocab_size=8192),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),  # Llama-3.2-1B
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),  # Llama-2-7B
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),  # Llama-3.1-8B
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=32000),  # Llama-2-13B
}  # fmt: skip
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUANT_BYTES = {"none": None, "nf4": 0.5 + 1 / 64 + 4 / 16384, "fp4": 0.5 + 1 / 64 + 4 / 16384, "int8": 1.0}


# ---- the formula ----------------------------------------------------------------------------------
def linear_shapes(shape: dict[str, Any]) -> list[tuple[int, int]]:
    """``(d_out, d_in)`` of one decoder layer's linear layers."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]


def predict(
    shape_name: str,
    *,
    quantization: str = "none",
    dtype_bytes: int = 2,
    compute_bytes: int = 2,
    rank: int = 16,
    batch: int = 4,
    seq: int = 512,
    checkpointing: bool = False,
    attention_scores: bool = False,
    side_rank: int = 0,
) -> dict[str, float]:
    """Bytes per component (see the module docstring) and their ``total``."""
    shape = SHAPES[shape_name]
    h, i, L, V = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    a = shape["num_attention_heads"]
    kv = h // a * shape["num_key_value_heads"]
    lins = linear_shapes(shape)
    n_lin = L * sum(o * k for o, k in lins)
    n_emb = V * h * (1 if shape.get("tie_word_embeddings") else 2)
    n_norm = (2 * L + 1) * h
    c, b, s = compute_bytes, batch, seq
    if quantization == "none":
        weights = (n_lin + n_emb + n_norm) * dtype_bytes
    else:
        rows = L * sum(o for o, _ in lins)
        weights = n_lin * QUANT_BYTES[quantization] + (rows * 4 if quantization == "int8" else 0) + (n_emb + n_norm) * 4
    lora = L * sum(rank * (o + k) for o, k in lins)
    layer = 2 * (4 + c) * b * s * h + c * b * s * (2 * h + 2 * kv) + 4 * c * b * s * i
    if attention_scores:
        layer += 2 * c * b * a * s * s
    residual = 4 if quantization != "none" or dtype_bytes == 4 else dtype_bytes  # fp32 embeddings: fp32 stream
    activations = (L * residual * b * s * h + layer) if checkpointing else L * layer
    out = {
        "base_weights": float(weights),
        "lora_and_optimizer": float(16 * lora),
        "activations": float(activations),
        "logits_and_loss": float(3 * 4 * b * s * V),
        "side_path": float(L * sum(4 * (o + k) * side_rank for o, k in lins)),
        "dequant_workspace": float(c * max(o * k for o, k in lins)) if quantization != "none" else 0.0,
    }
    out["total"] = sum(out.values())
    out["lora_params"] = float(lora)
    return out


# ---- the model ------------------------------------------------------------------------------------
def random_llama(shape_name: str, dtype: torch.dtype, device: str, seq: int, quantization: str = "none"):
    """A random LLaMA of ``shape_name`` on ``device``; quantized decoder linears with
    ``quantization`` (bitsandbytes layers computing in ``dtype``, then PEFT's k-bit preparation,
    as ``fedlora.model.loading.load_model`` does for a checkpoint)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape_name], max_position_embeddings=max(seq, 128))
    if quantization == "none":
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
        return model.to(dtype)
    import bitsandbytes as bnb

    from fedlora.model.quantization import prepare_quantized

    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(dtype)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, torch.nn.Linear):
                    continue
                if quantization == "int8":
                    q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=False, has_fp16_weights=False)
                    q.weight = bnb.nn.Int8Params(lin.weight.data.to(torch.float16), requires_grad=False)
                else:
                    q = bnb.nn.Linear4bit(
                        lin.in_features, lin.out_features, bias=False, compute_dtype=dtype,
                        quant_type=quantization, compress_statistics=True,
                    )  # fmt: skip
                    q.weight = bnb.nn.Params4bit(
                        lin.weight.data, requires_grad=False, quant_type=quantization, compress_statistics=True
                    )
                setattr(parent, name, q.to(device))  # quantized here, one layer at a time
                del lin
    model.to(device)
    model.is_loaded_in_4bit = quantization in ("nf4", "fp4")
    model.is_loaded_in_8bit = quantization == "int8"
    return prepare_quantized(model)


# ---- the measurement ------------------------------------------------------------------------------
def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return float(torch.cuda.memory_allocated())
    gc.collect()
    return float((_status_kib("VmRSS") or 0) * 1024)


def _peak(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated())
    return float((_status_kib("VmHWM") or 0) * 1024)


def _reset_peak(device: torch.device) -> None:
    """Start a new peak: CUDA's counter, or the process's VmHWM (Linux: ``5`` to ``clear_refs``),
    so building the model (which passes through full precision) does not count as the step's."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    start = _now(device)
    model = random_llama(args.shape, dtype, args.device, args.seq, args.quantization)
    after_model = _now(device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    for p in trainable:  # the optimizer's state and the gradients exist before the measured step
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=False)
    after_optimizer = _now(device)
    vocab = SHAPES[args.shape]["vocab_size"]
    g = torch.Generator().manual_seed(0)
    model.train()
    amp = dtype if dtype != torch.float32 and device.type == "cuda" else None
    before_step = _now(device)
    _reset_peak(device)
    step_seconds = []
    for _ in range(args.steps):
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_seconds.append(time.perf_counter() - t)
    peak = _peak(device)
    lora_params = sum(p.numel() for p in trainable)
    return {
        "base_weights": after_model - start,
        "lora_and_optimizer": after_optimizer - after_model,
        "step_peak_above_state": peak - before_step,
        "total": peak - start,  # the step's peak above the process's start
        "lora_params": float(lora_params),
        "step_seconds": step_seconds,
        "seconds": time.perf_counter() - t0,
        "how": "torch.cuda.memory_allocated" if device.type == "cuda" else "process RSS (VmRSS/VmHWM)",
    }


def fmt_gib(x: float) -> str:
    return f"{x / 2**30:.2f}"


def predict_table(args: argparse.Namespace) -> str:
    rows = ["| shape | quant | ckpt | base | LoRA+opt | activations | logits | total GiB |", "|---" * 8 + "|"]
    for name in ("1b", "7b", "8b", "13b"):
        for quant in ("none", "nf4"):
            for ckpt in (False, True):
                p = predict(name, quantization=quant, rank=args.rank, batch=args.batch, seq=args.seq,
                            checkpointing=ckpt)  # fmt: skip
                rows.append(
                    f"| {name} | {quant} | {'yes' if ckpt else 'no'} | {fmt_gib(p['base_weights'])} | "
                    f"{fmt_gib(p['lora_and_optimizer'])} | {fmt_gib(p['activations'])} | "
                    f"{fmt_gib(p['logits_and_loss'])} | **{fmt_gib(p['total'])}** |"
                )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--dtype", default=None, help="base / compute dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--quantization", choices=sorted(QUANT_BYTES), default="none")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--predict", action="store_true", help="print the formula's table for 1B/7B/8B/13B and exit")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.predict:
        print(predict_table(args))
        return {}
    if not args.device.startswith("cuda") and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # glibc's dynamic mmap threshold keeps freed activations in the heap, so RSS would overstate
        # live memory (2-3x on the step); a fixed threshold returns every large block at once
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    dtype_bytes = torch.finfo(getattr(torch, args.dtype)).bits // 8
    predicted = predict(
        args.shape,
        quantization=args.quantization,
        dtype_bytes=dtype_bytes,
        compute_bytes=dtype_bytes,
        rank=args.rank,
        batch=args.batch,
        seq=args.seq,
        checkpointing=args.gradient_checkpointing,
        attention_scores=not args.device.startswith("cuda"),
    )
    measured = measure(args)
    measured_activations = measured["step_peak_above_state"]
    comparison = {
        "base_weights": (predicted["base_weights"], measured["base_weights"]),
        "lora_and_optimizer": (predicted["lora_and_optimizer"], measured["lora_and_optimizer"]),
        "step (activations + logits + workspace)": (
            predicted["activations"] + predicted["logits_and_loss"] + predicted["dequant_workspace"],
            measured_activations,
        ),
        "total": (predicted["total"], measured["total"]),
    }
    print(f"{args.shape} {args.quantization} {args.dtype} r={args.rank} b={args.batch} s={args.seq} "
          f"checkpointing={args.gradient_checkpointing} on {args.device} ({measured['how']})")  # fmt: skip
    print(f"{'component':42s} {'predicted MiB':>14s} {'measured MiB':>13s} {'ratio':>7s}")
    for k, (pr, me) in comparison.items():
        ratio = me / pr if pr else float("nan")
        print(f"{k:42s} {pr / MIB:14.1f} {me / MIB:13.1f} {ratio:7.2f}")
    out = {"args": vars(args), "predicted": predicted, "measured": measured,
           "comparison_mib": {k: [v[0] / MIB, v[1] / MIB] for k, v in comparison.items()}}  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
