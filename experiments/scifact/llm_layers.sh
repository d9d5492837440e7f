#!/bin/bash
# The layer-wise LLM reranker's table (docs/llm_reranker.md, experiments/results/llm_layers/): SmolLM2-135M-Instruct
# re-ranking BM25's top 20 on SciFact test, every scored layer untrained / stage 1 / stage 2, raw and interpolated with
# BM25, seconds per 100 documents per exit layer, paired tests, adaptive exit; every choice made on the dev split.
#   0. research dev-split: SciFact train minus a seeded 20 % dev share (runs/data/scifact-dev)
#   1. experiments/scifact/llm_reranker_stage1.yaml: frozen backbone, heads trained on cached states
#   2. experiments/scifact/llm_reranker_stage2.yaml: LoRA + heads from stage 1, fixed CPU budget
#   3. benchmarks/llm_exit_layers.py: per-layer scores of dev and test (state cache), table, JSON, figure
# Every step resumes: finished stages are skipped, stage 2 restarts from its last checkpoint, the backbone passes of
# step 3 live in the state cache ($RESEARCH_CACHE_DIR/llm_states) and its per-stage scores in $R/bench.
# Usage: RESEARCH_DATA_DIR=/work/shared/data bash experiments/scifact/llm_layers.sh [RUN_DIR [RESULTS_DIR]]
#   QUERIES=N: only the first N judged test queries (default 0: all 300).
set -euo pipefail
R=${1:-runs/llm_layers}
OUT=${2:-experiments/results/llm_layers}
B=${RESEARCH:-research}
PY=${PYTHON:-python}
export WANDB_MODE=${WANDB_MODE:-disabled} TOKENIZERS_PARALLELISM=false
mkdir -p "$R"
[ -f runs/data/scifact-dev/split.json ] || $B dev-split --data scifact --out runs/data/scifact-dev
[ -d "$R/stage1/model" ] || $B fit --config experiments/scifact/llm_reranker_stage1.yaml --run_dir "$R/stage1"
if [ ! -d "$R/stage2/model" ]; then
  RESUME=()
  [ -f "$R/stage2/checkpoints/last.ckpt" ] && RESUME=(--ckpt_path last)
  $B fit --config experiments/scifact/llm_reranker_stage2.yaml --run_dir "$R/stage2" \
      --model.init_args.model "$R/stage1/model" "${RESUME[@]}"
fi
$PY benchmarks/llm_exit_layers.py --data runs/data/scifact-dev --top-k 20 --queries "${QUERIES:-0}" \
    --stage stage1="$R/stage1/model" --stage stage2="$R/stage2/model" --work "$R/bench" --out "$OUT"
