#!/bin/bash
# zELO on SciFact, whole loop (CPU budget): 809 train queries x BM25 top-20, all 190 pairs each, judged by the
# ensemble of experiments/zelo/judges_scifact.yaml (BM25 + fine-tuned bi-encoder + fine-tuned cross-encoder);
# Thurstone fit; then two students with identical settings except their labels, both starting from the fine-tuned
# cross-encoder runs/cross_encoder/v3/model, 1 epoch, groups of 10, bf16-mixed, and tested by re-ranking BM25 top-100
# of the 300 test queries:
#   zelo  : PointwiseMSE + KLDistillation on the Thurstone logits        (experiments/zelo/student.yaml)
#   qrels : ListwiseSoftmaxCE on the binary qrels of the same candidates (experiments/zelo/student_qrels.yaml)
# Votes go in one chunk (--batch-size 200000), so the bi-encoder judge encodes each distinct document once.
# Usage: RESEARCH_DATA_DIR=../shared/data bash experiments/zelo/scifact.sh [OUT_DIR]   (every step resumable/re-runnable)
set -euo pipefail
R=${1:-runs/zelo_scifact_full}
B=${RESEARCH:-research}
export WANDB_MODE=${WANDB_MODE:-offline} TOKENIZERS_PARALLELISM=false
mkdir -p "$R"
$B zelo votes --data scifact --split train --candidates bm25 --top-n 20 --all-pairs \
    --judges experiments/zelo/judges_scifact.yaml --out "$R/votes.jsonl" --precision bf16-mixed --batch-size 200000 --quiet
$B zelo fit --votes "$R/votes.jsonl" --out "$R/scores.jsonl" --groups "$R/groups.jsonl"
$B zelo qrels-groups --data scifact --split train --top-n 20 --out "$R/qrels_groups.jsonl"
STUDENT=(--model.init_args.model runs/cross_encoder/v3/model --model.init_args.lr 2.0e-5 --model.init_args.fast_dropout true
         --trainer.precision bf16-mixed --trainer.max_epochs 1 --trainer.enable_progress_bar false
         --data.init_args.eval_top_k 100 --data.init_args.group_size 10 --data.init_args.batch_size 4)
# the two students side by side, one core each
OMP_NUM_THREADS=1 $B zelo train --config experiments/zelo/student.yaml --run_dir "$R/student_zelo" \
    --data.init_args.groups_file "$R/groups.jsonl" "${STUDENT[@]}" > "$R/student_zelo.log" 2>&1 &
ZELO=$!
OMP_NUM_THREADS=1 $B fit --config experiments/zelo/student_qrels.yaml --run_dir "$R/student_qrels" \
    --data.init_args.groups_file "$R/qrels_groups.jsonl" "${STUDENT[@]}" > "$R/student_qrels.log" 2>&1 &
QRELS=$!
wait $ZELO; wait $QRELS
grep -h "after fit" "$R/student_zelo.log" "$R/student_qrels.log"
