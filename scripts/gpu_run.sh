#!/usr/bin/env bash
# Everything unmask checks and times on a GPU, in one call of under 10 minutes (the device is lent
# for minutes): correctness checks, `unmask bench` on random-weight LLaDA2-mini, LLaDA-8B (bf16 and
# int8 weights) and LLaDA-MoE-7B-A1B shapes, served tokens/s next to the bench's
# (scripts/serve_speed.py), then what time is left allows. Stages run most important first, each
# under its own time limit and all under one budget ($BUDGET_S, 540 s): a stage that no longer
# fits is skipped and says so (run it by name in a second call).
# Results land in $OUT (default ./gpu_out): a log, JSON and Markdown per stage, and summary.md,
# one table of every number with the hardware, the issue-13 targets and each stage's status.
# Usage: bash scripts/gpu_run.sh [STAGE...]   (default: every stage; names as in the stage/bench lines)
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
# The GPU image has PyTorch but no web stack: the serve stage needs FastAPI and uvicorn, carried as
# wheels (`bash scripts/gpu_wheels.sh` here, then run with carry [".whl"]).
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
START=$(date +%s); BUDGET=${BUDGET_S:-540}; ONLY=" $* "
: > "$OUT/stages.tsv"

stage() {  # stage NAME SECONDS COMMAND...: at most SECONDS, and never past the budget (15 s kept for the summary)
  local name=$1 limit=$2; shift 2
  [ "$ONLY" = "  " ] || [[ "$ONLY" == *" $name "* ]] || return 0
  local left=$(( START + BUDGET - 15 - $(date +%s) ))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 30 ]; then
    echo "=== skip $name: ${left}s of the budget left"; printf '%s\tskipped (budget)\t0\n' "$name" >> "$OUT/stages.tsv"
    return 0
  fi
  echo "=== $name (limit ${limit}s, $(date +%T))"
  local t0=$(date +%s)
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\n' "$name" "$([ "$rc" = 124 ] && echo "timed out" || echo "exit $rc")" $(( $(date +%s) - t0 )) \
    >> "$OUT/stages.tsv"
}

bench() {  # bench NAME SECONDS SHAPE "BATCHES" MODE...
  local name=$1 limit=$2 shape=$3 batches=$4; shift 4
  # shellcheck disable=SC2086  # BATCHES is a list
  stage "$name" "$limit" python3 -m unmask.cli bench --shape "$shape" --device cuda --dtype bfloat16 \
    --batch-sizes $batches --prompt-len 64 --gen-length 256 --block-length 32 --repeats 1 --no-agreement \
    --json "$OUT/$name.json" --markdown "$OUT/$name.md" --modes "$@"
}

nvidia-smi -L
stage checks 90 python3 scripts/gpu_checks.py                               # graphed = eager tokens, kernels
bench llada2-mini 170 llada2-mini "1 8" "block cache" "block cache+cfg" "block cache+cfg reuse"
bench llada-8b_b1 100 llada-8b 1 exact dual+graph dual+cfg+graph "dual+cfg reuse+graph" "dual+graph 4/step"
stage serve 150 python3 scripts/serve_speed.py --shape llada-8b --json "$OUT/serve.json" --markdown "$OUT/serve.md"
# int8 weights: logit error and token agreement against bf16 (in the JSON's meta), then the timings
bench llada-8b_int8 120 llada-8b 1 dual+graph "dual+graph 4/step" --quantize int8
bench llada-moe-7b-a1b_b1 90 llada-moe-7b-a1b 1 dual+graph dual+cfg+graph "dual+graph 4/step"
bench llada-8b_b8 100 llada-8b 8 dual+graph "dual+graph 4/step"   # serve has batch 8 dual+graph already
bench llada-moe-7b-a1b_b8 70 llada-moe-7b-a1b 8 dual+graph
bench llada-8b_compile 300 llada-8b 1 dual+graph dual+graph+compile   # compiling an 8B model takes minutes
stage train 100 bash -c "python3 -m unmask.data.world --out /tmp/world --docs 4000 --sft 0 --no-suite > /dev/null &&
  python3 -m unmask.cli train --data /tmp/world/train.jsonl --tokenizer src/unmask/assets/model --out /tmp/run \
    --device cuda --bf16 --compile --activation-checkpointing --batch-size 64 --max-steps 40 --eval-every 20 \
    --save-every 20 --no-progress 2>&1 | tail -5 && cp /tmp/run/metrics.jsonl $OUT/train_metrics.jsonl"

GPU=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null)
python3 - "$OUT" "$*" "${GPU:-no GPU}" <<'EOF'
"""summary.md: the issue-13 targets, every timing in one table, the stages and the checks, with the hardware."""
import glob, json, os, sys

out, args, gpu = sys.argv[1:4]
TARGETS = {  # (stage, batch, mode): (goal, unit); a speedup is over the plain reference of the same stage
    ("llada-8b_b1", 1, "dual+graph"): (180, "tokens/s"), ("llada-8b_b1", 1, "dual+cfg+graph"): (150, "tokens/s"),
    ("llada-8b_b1", 1, "dual+cfg reuse+graph"): (170, "tokens/s"),
    ("llada-8b_b1", 1, "dual+graph 4/step"): (600, "tokens/s"), ("llada-8b_b1", 1, "exact"): (1.5, "speedup"),
    ("llada-8b_b8", 8, "dual+graph"): (1000, "tokens/s"), ("llada-8b_int8", 1, "dual+graph"): (250, "tokens/s"),
    ("llada-moe-7b-a1b_b1", 1, "dual+graph"): (250, "tokens/s"),
    ("llada-moe-7b-a1b_b1", 1, "dual+cfg+graph"): (220, "tokens/s"),
    ("llada-moe-7b-a1b_b1", 1, "dual+graph 4/step"): (700, "tokens/s"),
}
hw, targets = {}, []
rows = ["| stage | model | params | batch | mode | tokens/s | speedup |", "|---|---|---|---|---|---|---|"]
for path in sorted(glob.glob(f"{out}/*.json")):
    stage, data = os.path.basename(path)[:-5], json.load(open(path))
    hw = hw or data["meta"]["hardware"]
    if stage == "serve":
        b8 = next((b["tokens_per_s"] for b in data["bench"] if b["batch"] == 8), None)
        c8 = next((s["tokens_per_s"] for s in data["served"] if s["concurrency"] == 8), None)
        if b8:
            targets.append(f"| llada-8b, batch 8, dual+graph (serve's bench) | tokens/s >= 1000 | {b8:.2f} | "
                           f"{'met' if b8 >= 1000 else 'not met'} |")
        if b8 and c8:
            targets.append(f"| served at concurrency 8 / bench batch 8 | >= 0.80 | {c8 / b8:.2f} ({c8:.1f} / "
                           f"{b8:.1f} tokens/s) | {'met' if c8 >= 0.8 * b8 else 'not met'} |")
        continue
    meta = data["meta"]
    if meta.get("quantization_error"):
        e = meta["quantization_error"]
        targets.append(f"| {stage}: {meta['quantize']} vs bf16 (logit error max {e['max_logit_error']:.4f}, mean "
                       f"{e['mean_logit_error']:.4f}; argmax agreement {e['argmax_agreement']:.4f}) | token "
                       f"agreement at temperature 0 | {e['token_agreement']:.4f} | reported |")
    for r in data["rows"]:
        rows.append(f"| {stage} | {meta['model']} | {meta['parameters'] / 1e9:.2f}B | {r['batch']} | {r['mode']} | "
                    f"{r['tokens_per_s']:.1f} | {r['speedup']:.2f}x |")
        goal, unit = TARGETS.get((stage, r["batch"], r["mode"]), (None, None))
        if goal is not None:
            got = r["tokens_per_s"] if unit == "tokens/s" else r["speedup"]
            targets.append(f"| {stage}, batch {r['batch']}, {r['mode']} | {unit} >= {goal} | {got:.2f} | "
                           f"{'met' if got >= goal else 'not met'} |")
stages = [line.rstrip("\n").split("\t") for line in open(f"{out}/stages.tsv")]
checks = [line.rstrip() for f in glob.glob(f"{out}/checks.log") for line in open(f) if line.startswith(("PASS", "FAIL"))]
doc = [f"# GPU run: `{' '.join(['bash scripts/gpu_run.sh', *args.split()])}`", "",
       f"GPU: {gpu}; " + ", ".join(f"{k}: {v}" for k, v in hw.items()), "",
       "Random weights of each shape, bf16, prompt 64, gen 256, block 32, cfg_scale 1.0, one timed run after a "
       "warm-up.", "", "## Issue 13 targets", "", "| target | goal | measured | |", "|---|---|---|---|", *targets,
       "", "## Every timing", "", *rows, ""]
if os.path.exists(f"{out}/serve.md"):
    doc += ["## Served next to the bench (scripts/serve_speed.py)", "", open(f"{out}/serve.md").read()]
doc += ["## Stages", "", "| stage | status | seconds |", "|---|---|---|", *(f"| {' | '.join(s)} |" for s in stages),
        "", "## Checks", "", *(f"- {c}" for c in checks), ""]
open(f"{out}/summary.md", "w").write("\n".join(doc))
print("\n".join(doc))
EOF
