#!/usr/bin/env bash
# Every GPU measurement of fedlora in one go: benchmarks/gpu.sh OUT_DIR [--smoke]
#
# On one H100 (or H200) it runs, in about 8 minutes:
#   1. the CUDA-only tests (they skip on machines without a GPU);
#   2. FedMomentum's aggregation of the LLaMA-2-7B adapter set on CUDA (aggregation.py);
#   3. one federated round against plain PEFT at the 1B and 7B shapes, bf16 and nf4 (round.py:
#      overhead, throughput, memory);
#   4. the memory model against measured device memory (memory.py), including the target
#      7B nf4, r=16 on all linear layers, seq 512, batch 4, checkpointing: <= 10 GB;
#   5. the side path's cost on the default run (FLoRA, bf16: side against merge);
#   6. padding-free batches against padded rows (packing.py: useful tokens/s, SDPA and, where
#      flash-attn is installed, flash-attention 2), and a model reload per client call against a
#      factor swap (reload.py, nf4);
#   7. DP-SGD's step against a plain local step (dpsgd.py: 1B nf4 and 7B nf4, bf16, r=16 on all
#      linear layers, seq 512, batch 4: time and peak memory);
#   8. the momentum diagnostics' cost per round against the aggregation (momentum.py: LLaMA-2-7B
#      shapes, 10 clients, r=16, float64 reductions on the GPU);
#   9. clients in parallel (backends.py, engine.backend local against ray): two workers sharing the
#      GPU (gpus_per_worker 0.5, the ci preset on CUDA), and 8 CPU workers on the machine's cores
#      against local on all of them (the tiny LLaMA shape, with the perfect-parallel ceiling);
# and writes their JSON and a short summary.md into OUT_DIR. --smoke runs the same steps on the
# CPU at toy shapes in about a minute (the test suite runs it, so the script cannot rot).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: benchmarks/gpu.sh OUT_DIR [--smoke]}
MODE=${2:-gpu}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE
log() { echo "[gpu.sh $(date +%H:%M:%S)] $*" | tee -a "$OUT/log.txt"; }

if [ "$MODE" = "--smoke" ]; then
  DEV=cpu
  AGG=(--layers 1 --clients 2 --rank 2 --repeats 1 --hidden 64 --intermediate 128)
  ROUNDS=("micro float32 nf4 ckpt")
  ROUND=(--clients 2 --steps 1 --rounds 2 --warmup 1 --seq 32 --batch 1 --rank 4)
  MEMORY=("micro float32 nf4 4 64 2 ckpt")
  TESTS=(tests/test_lowrank_svd.py -k "cuda or gpu")
else
  DEV=cuda
  AGG=()
  ROUNDS=("1b bfloat16 none x" "1b bfloat16 nf4 ckpt" "7b bfloat16 none ckpt" "7b bfloat16 nf4 ckpt")
  ROUND=(--clients 4 --steps 2 --rounds 3 --warmup 1 --seq 512 --batch 4 --rank 16)
  MEMORY=("7b bfloat16 nf4 16 512 4 ckpt" "7b bfloat16 nf4 16 512 4 x" "8b bfloat16 nf4 16 512 4 ckpt"
          "1b bfloat16 none 16 512 4 x")
  TESTS=(tests/test_lowrank_svd.py tests/test_aggregate_cli.py tests/test_model_side.py -k "cuda or gpu")
fi

log "machine"
{ command -v nvidia-smi >/dev/null && nvidia-smi || true; } > "$OUT/nvidia-smi.txt" 2>&1
"$PY" -c "import json, torch; print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, \
'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None}))" > "$OUT/env.json"

log "CUDA-only tests"
"$PY" -m pytest -q -rs "${TESTS[@]}" > "$OUT/tests.txt" 2>&1 || log "tests FAILED (see tests.txt)"

log "aggregation"
"$PY" benchmarks/aggregation.py --device "$DEV" "${AGG[@]}" --json "$OUT/aggregation.json" > "$OUT/aggregation.txt" 2>&1

for spec in "${ROUNDS[@]}"; do
  read -r shape dtype quant ckpt <<< "$spec"
  name="round-$shape-$quant${ckpt/x/}"
  log "$name"
  flags=(--device "$DEV" --shape "$shape" --dtype "$dtype" --quantization "$quant" "${ROUND[@]}")
  [ "$ckpt" = ckpt ] && flags+=(--gradient-checkpointing)
  "$PY" benchmarks/round.py "${flags[@]}" --json "$OUT/$name.json" > "$OUT/$name.txt" 2>&1 \
    || log "$name FAILED (see $name.txt)"
done

for spec in "${MEMORY[@]}"; do
  read -r shape dtype quant rank seq batch ckpt <<< "$spec"
  name="memory-$shape-$quant${ckpt/x/}"
  log "$name"
  flags=(--device "$DEV" --shape "$shape" --dtype "$dtype" --quantization "$quant" --rank "$rank" --seq "$seq" --batch "$batch")
  [ "$ckpt" = ckpt ] && flags+=(--gradient-checkpointing)
  "$PY" benchmarks/memory.py "${flags[@]}" --json "$OUT/$name.json" > "$OUT/$name.txt" 2>&1 \
    || log "$name FAILED (see $name.txt)"
done

if [ "$MODE" != "--smoke" ]; then
  # the side path's cost on the default run: FLoRA (a backbone delta every round) on a bf16 base,
  # side path against merge (inexact, the timing baseline); rank and bytes per round in metrics.jsonl
  for mode in side merge; do
    log "default run, bf16, flora, backbone_delta=$mode"
    "$PY" -m fedlora.cli run --set name="default-flora-bf16-$mode" --set output_dir="$OUT/runs" \
      --set model.dtype=bfloat16 --set model.device=cuda --set method.name=flora \
      --set model.backbone_delta="$mode" --set rounds.eval_every=0 --set rounds.eval_baseline=false \
      > "$OUT/default-flora-$mode.txt" 2>&1 || log "default run ($mode) FAILED"
  done
fi

if [ "$MODE" = "--smoke" ]; then
  PACKING=(--presets default --steps 1 --warmup 0)
  RELOAD=(--repeats 1 --swaps 2 --set model.quantization=none)  # float32: the smoke checks the wiring
  ATTENTIONS=(auto)
else
  PACKING=(--presets default instruction shakespeare --steps 20 --warmup 3 --set model.dtype=bfloat16)
  ATTENTIONS=(sdpa)
  RELOAD=(--repeats 2 --set model.quantization=nf4)
  "$PY" -c "import flash_attn" 2>/dev/null && ATTENTIONS+=(flash_attention_2)
fi
log "reload per client call against a factor swap"
"$PY" benchmarks/reload.py --preset ci --set model.device="$DEV" "${RELOAD[@]}" \
  --json "$OUT/reload.json" > "$OUT/reload.txt" 2>&1 || log "reload FAILED"

for attn in "${ATTENTIONS[@]}"; do
  log "packing ($attn)"
  "$PY" benchmarks/packing.py --device "$DEV" "${PACKING[@]}" --set model.attention="$attn" \
    --json "$OUT/packing-$attn.json" > "$OUT/packing-$attn.txt" 2>&1 || log "packing ($attn) FAILED"
done

if [ "$MODE" = "--smoke" ]; then
  DPSGD=("micro float32 none --steps 2 --seq 32 --batch 2 --rank 4")
else
  DPSGD=("1b bfloat16 nf4 --steps 10 --seq 512 --batch 4 --rank 16" "7b bfloat16 nf4 --steps 5 --seq 512 --batch 4 --rank 16")
fi
for spec in "${DPSGD[@]}"; do
  read -r shape dtype quant rest <<< "$spec"
  name="dpsgd-$shape-$quant"
  log "$name"
  # shellcheck disable=SC2086
  "$PY" benchmarks/dpsgd.py --device "$DEV" --shape "$shape" --dtype "$dtype" --quantization "$quant" $rest \
    --json "$OUT/$name.json" > "$OUT/$name.txt" 2>&1 || log "$name FAILED (see $name.txt)"
done

if [ "$MODE" = "--smoke" ]; then
  MOMENTUM=(--layers 1 --hidden 32 --intermediate 64 --clients 2 --rank 2 --rounds 2)
else
  MOMENTUM=(--layers 32 --hidden 4096 --intermediate 11008 --clients 10 --rank 16 --rounds 4)
fi
log "momentum diagnostics against the aggregation"
"$PY" benchmarks/momentum.py --device "$DEV" "${MOMENTUM[@]}" --json "$OUT/momentum.json" \
  > "$OUT/momentum.txt" 2>&1 || log "momentum FAILED (see momentum.txt)"

# clients in parallel: Ray workers against the local backend (no evaluation between rounds)
CORES=$(nproc)
BACKENDS_COMMON=(--preset ci --set rounds.eval_every=0 --set rounds.eval_baseline=false)
if [ "$MODE" = "--smoke" ]; then
  BACKENDS=("cpu 2 --cores 2 --tiny-shape $OUT/tiny-llama --ceiling --set train.max_steps=1 --set rounds.num_rounds=1")
else
  BACKENDS=("gpu 2 --gpus-per-worker 0.5 --set model.device=cuda --set train.max_steps=16 --set rounds.num_rounds=4"
            "cpu 8 --cores $CORES --tiny-shape $OUT/tiny-llama --ceiling --set partition.num_clients=16
             --set rounds.clients_per_round=8 --set task.settings.n_train=256 --set train.max_steps=16
             --set rounds.num_rounds=3")
fi
for spec in "${BACKENDS[@]}"; do
  read -r -d '' where workers rest <<< "$spec" || true
  name="backends-$where-$workers"
  log "$name"
  # shellcheck disable=SC2086
  "$PY" benchmarks/backends.py "${BACKENDS_COMMON[@]}" --workers "$workers" $rest --json "$OUT/$name.json" \
    > "$OUT/$name.txt" 2>&1 || log "$name FAILED (see $name.txt)"
done

"$PY" benchmarks/gpu_summary.py "$OUT" > "$OUT/summary.md"
log "done: $OUT/summary.md"
