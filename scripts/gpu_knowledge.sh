#!/usr/bin/env bash
# The knowledge model on one lent GPU, in one command of under 10 minutes:
# `bash recipes/build_model.sh knowledge-gpu` (corpus, tokenizer, training, the checkpoint curve
# scored on the GPU), then what a lease can carry back under $OUT (at most 8 files of 16 MiB): the
# final model in float32, split in two (cat model.part-* > model.safetensors), two earlier
# checkpoints in bfloat16, and meta.tar.gz (config, tokenizer, metrics, curve). The recipe's
# max_steps was sized by a 60-step probe on the first H200 lent (1.17M tokens/s).
# Usage: OUT=dir bash scripts/gpu_knowledge.sh
set -euo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
run=runs/knowledge_model_gpu
exec > >(tee "$OUT/gpu_knowledge.log") 2>&1
nvidia-smi -L || true
SECONDS=0
bash recipes/build_model.sh knowledge-gpu
echo "=== recipe done in $SECONDS s; packaging"
final=$run/$(cat "$run/latest")
split -b 15M -d "$final/model.safetensors" "$OUT/model.part-"
python3 - "$run" "$OUT" "$final" <<'PY'
import sys
from pathlib import Path
from safetensors.torch import load_file, save_file
run, out, final = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
steps = sorted(p for p in run.glob("step-*") if p != final)
for ckpt in [steps[0], steps[len(steps) // 2]] if len(steps) >= 2 else steps:
    weights = {k: v.bfloat16() for k, v in load_file(ckpt / "model.safetensors").items()}
    save_file(weights, out / f"{ckpt.name}.bf16.safetensors")
PY
shopt -s nullglob
tar czf "$OUT/meta.tar.gz" "$run"/train_config.json "$run"/metrics.jsonl "$run"/curve.* "$run"/loss_curve.png \
  "$final"/*.json "$final"/*.jinja
ls -la "$OUT"
