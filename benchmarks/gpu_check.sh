#!/usr/bin/env bash
# GPU check: the main job's model (experiments/scifact/bi_encoder.yaml) for a few steps under DDP, Lightning FSDP and
# DeepSpeed ZeRO-2 / ZeRO-3 (bf16, the experiments/strategies/*.yaml overlays), then `research index` + `research
# search --gpu` (exact, and an IVF index) on SciFact; prints each figure and a summary. Budget: under 8 minutes on
# one GPU (each step has its own time limit, so an overrun fails loudly instead of hanging).
#
#   benchmarks/gpu_check.sh [--steps N] [--devices N] [--out DIR] [--only ddp,fsdp,deepspeed_zero2,deepspeed_zero3,index]
#   benchmarks/gpu_check.sh --dry-run ...    # print the commands only (no GPU needed)
#
# Needs: a CUDA GPU, torch with CUDA, deepspeed (the 'gpu' extra) for the ZeRO runs, faiss-gpu for `--gpu` search,
# RESEARCH_DATA_DIR holding scifact/ (or network for the BEIR download). A missing piece is an error, never a skip.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-.venv/bin/python}"
STEPS=5
DEVICES=""
OUT=""
ONLY="ddp,fsdp,deepspeed_zero2,deepspeed_zero3,index"
DRY=0
ALL_STEPS=" ddp fsdp deepspeed_zero2 deepspeed_zero3 index "
FIT_LIMIT=75      # seconds per strategy run (model load + N steps)
INDEX_LIMIT=100   # seconds for research index on SciFact (5,183 documents)
SEARCH_LIMIT=45   # seconds per research search

die() { echo "gpu_check.sh: error: $*" >&2; exit 2; }
usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }
positive() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 expects a positive integer, got '$2'"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --steps) [[ $# -ge 2 ]] || die "--steps needs a value"; positive --steps "$2"; STEPS="$2"; shift 2 ;;
    --devices) [[ $# -ge 2 ]] || die "--devices needs a value"; positive --devices "$2"; DEVICES="$2"; shift 2 ;;
    --out) [[ $# -ge 2 ]] || die "--out needs a value"; OUT="$2"; shift 2 ;;
    --only) [[ $# -ge 2 ]] || die "--only needs a value"; ONLY="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
IFS=',' read -r -a SELECTED <<< "$ONLY"
[[ ${#SELECTED[@]} -gt 0 ]] || die "--only names nothing"
for step in "${SELECTED[@]}"; do
  [[ "$ALL_STEPS" == *" $step "* ]] || die "--only: unknown step '$step' (choose from:$ALL_STEPS)"
done
for step in "${SELECTED[@]}"; do
  [[ "$step" == index || -f "experiments/strategies/$step.yaml" ]] || die "experiments/strategies/$step.yaml is missing"
done
OUT="${OUT:-runs/gpu-check/$(date -u +%Y%m%d-%H%M%S)}"
DEVICE_ARGS=()
[[ -n "$DEVICES" ]] && DEVICE_ARGS=(--trainer.devices "$DEVICES")
INDEX_DEVICES="${DEVICES:-1}"

fit_command() {  # the main job for $STEPS steps under one strategy overlay, nothing saved but metrics.csv
  echo "$PY -m research.cli fit --config experiments/scifact/bi_encoder.yaml --config experiments/strategies/$1.yaml" \
       "--trainer.max_steps $STEPS --trainer.max_epochs 1 ${DEVICE_ARGS[*]} --evaluate_before_fit false" \
       "--test_after_fit false --save_model false --checkpoint_every_n_steps 0 --run_dir $OUT/$1"
}
INDEX_CMD="$PY -m research.cli index --model sentence-transformers/all-MiniLM-L6-v2 --data scifact --out $OUT/index --accelerator gpu --devices $INDEX_DEVICES --batch-size 128 --shard-size 2048"
SEARCH_CMD="$PY -m research.cli search --index $OUT/index --data scifact --split test --out $OUT/search-exact --gpu"
IVF_CMD="$PY -m research.cli search --index $OUT/index --data scifact --split test --out $OUT/search-ivf --gpu --index-factory IVF64,Flat --nprobe 8"

if [[ $DRY -eq 1 ]]; then
  for step in "${SELECTED[@]}"; do
    if [[ "$step" == index ]]; then printf '%s\n' "$INDEX_CMD" "$SEARCH_CMD" "$IVF_CMD"; else fit_command "$step"; fi
  done
  exit 0
fi

# ---------------------------------------------------------------- preflight: every requirement, before any run
command -v nvidia-smi > /dev/null || die "no NVIDIA GPU here (nvidia-smi not found): this check needs a GPU host"
GPUS=$(nvidia-smi -L 2> /dev/null | grep -c '^GPU' || true)
[[ "$GPUS" -gt 0 ]] || die "nvidia-smi lists no GPU: this check needs a GPU host"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || die "torch sees no CUDA device (a CPU build of torch, or CUDA_VISIBLE_DEVICES hides the GPUs)"
if [[ " ${SELECTED[*]} " == *" deepspeed_"* ]]; then
  "$PY" -c "import deepspeed" 2> /dev/null || die "deepspeed is not installed (pip install -e '.[gpu]')"
fi
if [[ " ${SELECTED[*]} " == *" index "* ]]; then
  "$PY" -c "import faiss, sys; sys.exit(0 if hasattr(faiss, 'StandardGpuResources') and faiss.get_num_gpus() > 0 else 1)" \
    || die "faiss has no GPU support here (faiss-cpu installed?): pip install -e '.[gpu]'"
fi
mkdir -p "$OUT"
echo "gpu_check: $GPUS GPU(s), $STEPS steps per strategy, output in $OUT"

SUMMARY=()
STARTED=$SECONDS
run_timed() {  # run_timed NAME LIMIT COMMAND...: log to $OUT/NAME.log, sample GPU memory, print wall time and peak
  local name="$1" limit="$2"; shift 2
  local log="$OUT/$name.log" mem="$OUT/$name.gpu-mem" begin=$SECONDS
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 > "$mem" 2> /dev/null &
  local sampler=$!
  local rc=0
  timeout "$limit" "$@" > "$log" 2>&1 || rc=$?
  kill "$sampler" 2> /dev/null || true
  wait "$sampler" 2> /dev/null || true
  local wall=$((SECONDS - begin)) peak
  peak=$(sort -n "$mem" | tail -1)
  if [[ $rc -ne 0 ]]; then
    tail -20 "$log" >&2
    [[ $rc -eq 124 ]] && die "$name: over its ${limit}s limit (log: $log)"
    die "$name failed with exit code $rc (log: $log)"
  fi
  LAST_WALL=$wall LAST_PEAK=${peak:-?}
}

for step in "${SELECTED[@]}"; do
  [[ "$step" == index ]] && continue
  # shellcheck disable=SC2046
  run_timed "$step" "$FIT_LIMIT" $(fit_command "$step")
  loss=$("$PY" - "$OUT/$step" <<'EOF'
import csv, sys
from pathlib import Path
rows = [r for f in Path(sys.argv[1]).rglob("metrics.csv") for r in csv.DictReader(open(f)) if r.get("train/loss")]
print(f"{float(rows[-1]['train/loss']):.4f} at step {rows[-1].get('step', '?')}" if rows else "none logged")
EOF
)
  line="$step: $STEPS steps in ${LAST_WALL}s wall (with model load), peak GPU memory ${LAST_PEAK} MiB, last train/loss $loss"
  echo "$line"; SUMMARY+=("$line")
done

if [[ " ${SELECTED[*]} " == *" index "* ]]; then
  # shellcheck disable=SC2086
  run_timed index "$INDEX_LIMIT" $INDEX_CMD
  line="research index (MiniLM, SciFact, $INDEX_DEVICES GPU): ${LAST_WALL}s wall, peak GPU memory ${LAST_PEAK} MiB; $(grep -o 'wrote .*' "$OUT/index.log" | tail -1)"
  echo "$line"; SUMMARY+=("$line")
  for kind in exact ivf; do
    command_line=$SEARCH_CMD; [[ $kind == ivf ]] && command_line=$IVF_CMD
    # shellcheck disable=SC2086
    run_timed "search-$kind" "$SEARCH_LIMIT" $command_line
    line="research search --gpu ($kind): $(grep -E 'queries/s|nDCG@10' "$OUT/search-$kind.log" | tr '\n' ' ')"
    echo "$line"; SUMMARY+=("$line")
  done
fi

echo "---------------------------------------------------------------- gpu_check summary ($((SECONDS - STARTED)) s)"
printf '%s\n' "${SUMMARY[@]}"
[[ $((SECONDS - STARTED)) -le 480 ]] || die "took $((SECONDS - STARTED)) s, over the 8-minute budget"
