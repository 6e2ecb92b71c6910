#!/usr/bin/env bash
# Build a model of the synthetic world from nothing, with one command (run from anywhere):
#   bash recipes/build_model.sh knowledge    # the bundled model (world v2): ~75 minutes on 2 CPU cores
#   bash recipes/build_model.sh default      # the first bundled model: 73 minutes on one CPU core
#   bash recipes/build_model.sh recall       # the recall recipe on 2 CPU cores (about 75 minutes)
#   bash recipes/build_model.sh knowledge-gpu # a 6.8M-parameter knowledge model on one CUDA GPU
#                                            # (7.5 minutes on an H200; scripts/gpu_knowledge.sh)
#   bash recipes/build_model.sh recall-gpu   # the recall recipe on one CUDA GPU (two calls: the
#                                            # first stops at max_minutes; then add --resume)
# Steps: the corpus (unmask.data.knowledge for knowledge, unmask.data.world otherwise), its
# tokenizer, `unmask train` with the recipe's TOML, then for the knowledge and recall recipes every
# kept checkpoint scored at w = 0, 0.5, 1, 2 (OUT/curve.json and .png; the knowledge suite for
# knowledge, the first suite for recall). The finished model is OUT/$(cat OUT/latest); to ship one, copy its
# config.json, model.safetensors and tokenizer files into src/unmask/assets/model/.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  knowledge)  mix=knowledge; docs=600000; sft=0;   config=recipes/knowledge_model.toml; threads=2; shards=2 ;;
  knowledge-gpu) mix=knowledge; docs=1200000; sft=0; config=recipes/knowledge_model_gpu.toml; threads=; shards=16 ;;
  default)    mix=v1;     docs=150000;  sft=20000; config=recipes/default_model.toml; threads=1; shards=1 ;;
  recall)     mix=recall; docs=400000;  sft=0;     config=recipes/recall_model.toml;  threads=2; shards=1 ;;
  recall-gpu) mix=recall; docs=1500000; sft=0;     config=recipes/recall_model_gpu.toml; threads=; shards=16 ;;
  *) echo "usage: bash recipes/build_model.sh knowledge|knowledge-gpu|default|recall|recall-gpu" >&2; exit 2 ;;
esac
setting() { python3 -c "import sys, tomllib; print(tomllib.load(open(sys.argv[1], 'rb'))[sys.argv[2]])" "$config" "$1"; }
out=$(setting out_dir)
corpus=$(dirname "$(setting tokenizer)")
if [ -n "$threads" ]; then export OMP_NUM_THREADS=$threads; fi
curve() {  # every kept checkpoint on its suite, at w = 0, 0.5, 1, 2
  case "$mix" in
    knowledge) python3 scripts/eval_checkpoints.py "$out" --out "$out/curve" --points 6 --device "$(setting device 2>/dev/null || echo cpu)" ;;
    recall) python3 scripts/eval_checkpoints.py "$out" --out "$out/curve" --tasks world_mc,world_boolq,world_cloze,world_piqa,world_obqa ;;
  esac
}
if [ "${2:-}" = --resume ]; then  # continue a run that stopped (Ctrl-C, max_minutes), then its curve
  python3 -m unmask.cli train --config "$config" --resume --max-minutes 0
  curve
  echo "done: $out/$(cat "$out/latest")"; exit 0
fi
if [ -e "$out/latest" ]; then
  echo "$out already holds a run: move it away, or continue it with: bash recipes/build_model.sh $1 --resume" >&2
  exit 2
fi

if [ "$mix" = knowledge ]; then
  python3 -m unmask.data.knowledge --out "$corpus" --docs "$docs" --shards "$shards" --no-suite
else
  python3 -m unmask.data.world --out "$corpus" --docs "$docs" --sft "$sft" --mix "$mix" --shards "$shards" --no-suite
fi
texts=("$corpus/train.jsonl")
if [ "$sft" != 0 ]; then texts+=("$corpus/sft.jsonl"); fi
if [ "$shards" = 16 ]; then  # the GPU recipes: the world's vocabulary is all in the first 200k documents
  head -n 200000 "$corpus/train.jsonl" > "$corpus/tokenizer_sample.jsonl"; texts=("$corpus/tokenizer_sample.jsonl")
fi
python3 -m unmask.data.tokenizer --corpus "${texts[@]}" --out "$corpus/tokenizer" --vocab-size 2048
rc=0; python3 -m unmask.cli train --config "$config" || rc=$?
if [ "$rc" = 130 ]; then  # stopped early (max_minutes or Ctrl-C), checkpointed
  echo "stopped early: continue with bash recipes/build_model.sh $1 --resume"; exit 0
elif [ "$rc" != 0 ]; then exit "$rc"; fi
curve
echo "done: $out/$(cat "$out/latest")"
