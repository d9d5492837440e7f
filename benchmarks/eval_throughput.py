"""Evaluation throughput on SciFact test against sentence-transformers' InformationRetrievalEvaluator.

Same model (all-MiniLM-L6-v2, max length 256), queries, corpus (title + text) and qrels. The framework runs the
path of ``research evaluate`` (Lightning test loop: length-sorted batches, exact faiss search, metrics), in fp32 and
in bf16 autocast; sentence-transformers runs its evaluator in fp32. Each variant runs in a fresh subprocess.

    python benchmarks/eval_throughput.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import emit, run_variant, table  # noqa: E402

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
MAX_LENGTH = 256


def bench_framework(args, precision: str) -> dict:
    import lightning as L

    from datamodules.retrieval import RetrievalDataModule
    from modules.bi_encoder import BiEncoderModule

    class PhaseTimer(L.Callback):
        def on_test_start(self, trainer, module):
            self.start = time.perf_counter()

        def on_test_epoch_end(self, trainer, module):  # callbacks run before the module's hook: encoding is done
            self.encoded = time.perf_counter()

        def on_test_end(self, trainer, module):
            self.end = time.perf_counter()

    started = time.perf_counter()
    module = BiEncoderModule(model=MODEL, query_max_length=MAX_LENGTH, document_max_length=MAX_LENGTH,
                             cache_corpus_embeddings=False)  # time the encoding, not a cache hit
    data = RetrievalDataModule(args.data, train_split=None, eval_split="test", eval_batch_size=args.batch_size)
    timer = PhaseTimer()
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    trainer.test(module, datamodule=data, verbose=False)
    total = time.perf_counter() - started
    metrics = module.last_evaluation.metrics.aggregate
    return {"total_s": total, "encode_s": timer.encoded - timer.start, "search_metrics_s": timer.end - timer.encoded,
            "docs": len(data.eval_data.corpus), **{k: metrics[k] for k in ("nDCG@10", "RR@10", "R@100", "AP@100")}}


def bench_sentence_transformers(args) -> dict:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import (
        InformationRetrievalEvaluator,
    )

    from research.data.beir import load_dataset
    from research.models.pretrained import resolve_model

    started = time.perf_counter()
    model = SentenceTransformer(str(resolve_model(MODEL)), device="cpu")
    model.max_seq_length = MAX_LENGTH
    data = load_dataset(args.data, "test")
    relevant = {q: {d for d, g in docs.items() if g > 0} for q, docs in data.qrels.items()}
    evaluator = InformationRetrievalEvaluator(
        queries=data.judged_queries, corpus={d: doc.full_text for d, doc in data.corpus.items()}, relevant_docs=relevant,
        mrr_at_k=[10], ndcg_at_k=[10], accuracy_at_k=[1], precision_recall_at_k=[100], map_at_k=[100],
        batch_size=args.st_batch_size, write_csv=False,
    )
    eval_start = time.perf_counter()
    scores = evaluator(model)
    total = time.perf_counter() - started

    def pick(fragment):
        return next(v for k, v in scores.items() if k.startswith("cosine") and k.endswith(fragment))

    return {"total_s": total, "encode_s": None, "search_metrics_s": None, "evaluator_s": time.perf_counter() - eval_start,
            "docs": len(data.corpus), "nDCG@10": pick("ndcg@10"), "RR@10": pick("mrr@10"), "R@100": pick("recall@100"),
            "AP@100": pick("map@100")}


VARIANTS = {
    "framework-fp32": lambda a: bench_framework(a, "32-true"),
    "framework-bf16": lambda a: bench_framework(a, "bf16-mixed"),
    "sentence-transformers-fp32": bench_sentence_transformers,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=list(VARIANTS))
    parser.add_argument("--data", default="scifact")
    parser.add_argument("--batch-size", type=int, default=16, help="framework encoding batch (16 measured fastest on this CPU)")
    parser.add_argument("--st-batch-size", type=int, default=32, help="the evaluator's default")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.variant:
        emit(VARIANTS[args.variant](args))
        return
    passthrough = ["--data", args.data, "--batch-size", str(args.batch_size), "--st-batch-size", str(args.st_batch_size),
                   "--threads", str(args.threads)]
    rows = [{"variant": name, **run_variant(__file__, name, passthrough)} for name in VARIANTS]
    for row in rows:
        row["docs/s"] = row["docs"] / (row["encode_s"] or row["evaluator_s"])
    print(f"{args.data} test, {rows[0]['docs']} documents, max length {MAX_LENGTH}, threads {args.threads}; "
          "total = model load + data + encode + search + metrics")
    print(table(rows, ["variant", "total_s", "encode_s", "search_metrics_s", "docs/s", "peak_rss_mb", "steal_pct",
                       "nDCG@10", "RR@10", "R@100", "AP@100"]))
    st = rows[-1]
    for row in rows[:-1]:
        diff = max(abs(row[m] - st[m]) for m in ("nDCG@10", "RR@10", "R@100", "AP@100"))
        print(f"{row['variant']}: wall time {row['total_s'] / st['total_s']:.2f}x sentence-transformers' "
              f"(target <= 0.67x); max metric difference {diff:.4f}")


if __name__ == "__main__":
    main()
