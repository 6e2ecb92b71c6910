#!/usr/bin/env bash
# Everything unmask checks and times on a GPU, in one call (the device is lent for minutes):
#   correctness checks, `unmask bench` on random-weight LLaDA-8B and LLaDA-MoE-7B-A1B shapes at
#   batch 1 and 8, and a short bf16 training smoke run. Results land in $OUT (default: ./gpu_out).
# Usage: bash scripts/gpu_run.sh [all|graph]   (graph: the reference and the CUDA-graph modes only)
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
log() { echo "=== $* ($(date +%T))"; }
B1="exact exact+cfg dual dual+cfg dual+cfg\ reuse dual\ 4/step"
G1="dual+graph dual+cfg+graph dual+cfg\ reuse+graph dual+graph\ 4/step threshold+dual+cfg+graph"
B8="dual"
G8="dual+graph dual+cfg+graph dual+graph\ 4/step"
if [ "${1:-all}" = graph ]; then B1=""; B8=""; fi

log checks
nvidia-smi -L
timeout 120 python3 scripts/gpu_checks.py 2>&1 | tee "$OUT/checks.txt"

bench() {  # time-limit shape batch modes...
  local T=$1 shape=$2 batch=$3; shift 3
  log "bench $shape batch $batch"
  eval timeout "$T" python3 -m unmask.cli bench --shape "$shape" --device cuda --dtype bfloat16 --batch-sizes "$batch" \
    --prompt-len 64 --gen-length 256 --block-length 32 --repeats 1 --no-agreement --modes "$@" \
    --json "$OUT/bench_${shape}_b${batch}${TAG:-}.json" --markdown "$OUT/bench_${shape}_b${batch}${TAG:-}.md"
}
bench 150 llada-8b 1 $B1 $G1
bench 130 llada-8b 8 $B8 $G8
bench 130 llada-moe-7b-a1b 1 $B1 $G1
bench 110 llada-moe-7b-a1b 8 $B8 $G8
# inductor-compiled layers inside the graph (compiling an 8B model takes minutes: its own stage, last)
[ -n "$G1" ] && TAG=_compile bench 300 llada-8b 1 dual+graph dual+graph+compile

log "train smoke (bf16, compile, activation checkpointing, resume)"
python3 -m unmask.data.world --out /tmp/world --docs 4000 --sft 0 --no-suite > /dev/null
timeout 100 python3 -m unmask.cli train --data /tmp/world/train.jsonl --tokenizer src/unmask/assets/model \
  --out /tmp/run --device cuda --bf16 --compile --activation-checkpointing --batch-size 64 --max-steps 40 \
  --eval-every 20 --save-every 20 --no-progress 2>&1 | tail -5
timeout 50 python3 -m unmask.cli train --data /tmp/world/train.jsonl --tokenizer src/unmask/assets/model \
  --out /tmp/run --device cuda --bf16 --batch-size 64 --max-steps 60 --eval-every 20 --save-every 20 \
  --resume --no-progress 2>&1 | tail -3
cp /tmp/run/metrics.jsonl "$OUT/train_metrics.jsonl" 2>/dev/null
log done
for f in "$OUT"/bench_*.md; do echo "## $f"; cat "$f"; done
