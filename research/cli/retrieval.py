"""``research evaluate`` (dense retrieval) and ``research bm25``: a run file and its metrics."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def print_metrics(title: str, metrics: dict[str, float]) -> None:
    print(f"{title}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


def evaluation_trainer(precision: str = "32-true"):
    """A quiet single-device Trainer for evaluation commands."""
    import lightning as L

    return L.Trainer(accelerator="auto", devices=1, precision=precision, logger=False, enable_checkpointing=False,
                     enable_model_summary=False, use_distributed_sampler=False)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from datamodules.retrieval import RetrievalDataModule
    from modules.bi_encoder import BiEncoderModule
    from research.eval.evaluation import save_evaluation

    module = BiEncoderModule(model=args.model, document_max_length=args.max_length, query_max_length=args.max_length,
                             eval_top_k=args.top_k, trust_remote_code=args.trust_remote_code)
    data = RetrievalDataModule(args.data, train_split=None, eval_split=args.split, eval_batch_size=args.batch_size)
    started = time.perf_counter()
    evaluation_trainer(args.precision).test(module, datamodule=data, verbose=False)
    evaluation = module.last_evaluation
    save_evaluation(args.out, evaluation, tag="dense", model=str(args.model), data=str(args.data), split=args.split,
                    seconds=round(time.perf_counter() - started, 2))
    print_metrics(f"{args.model} on {args.data}/{args.split}", evaluation.metrics.aggregate)
    print(f"wrote {Path(args.out) / 'run.trec'} and {Path(args.out) / 'metrics.json'}")


def cmd_bm25(args: argparse.Namespace) -> None:
    from research.data.beir import load_dataset
    from research.eval.evaluation import evaluate_run, save_evaluation
    from research.retrieval.bm25 import BM25Config, bm25_search

    data = load_dataset(args.data, args.split)
    started = time.perf_counter()
    run = bm25_search(data, k=args.top_k, config=BM25Config(k1=args.k1, b=args.b))
    evaluation = evaluate_run(run, data.qrels)
    save_evaluation(args.out, evaluation, tag="bm25", data=str(args.data), split=args.split, k1=args.k1, b=args.b,
                    seconds=round(time.perf_counter() - started, 2))
    print_metrics(f"BM25 on {args.data}/{args.split}", evaluation.metrics.aggregate)
    print(f"wrote {Path(args.out) / 'run.trec'} and {Path(args.out) / 'metrics.json'}")


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="dense retrieval: encode, exact faiss search, run.trec + metrics.json")
    p.set_defaults(func=cmd_evaluate)
    p.add_argument("--model", required=True, help="model directory, packaged name or hub id")
    p.add_argument("--data", required=True, help="dataset folder or name under $RESEARCH_DATA_DIR")
    p.add_argument("--split", default="test")
    p.add_argument("--out", required=True, help="output directory for run.trec and metrics.json")
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16, help="texts per encoding batch (default 16: small length-sorted batches are fastest on CPU; raise it on a GPU)")
    p.add_argument("--max-length", type=int, default=None, help="override query and document max length")
    p.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed")
    p.add_argument("--trust-remote-code", action="store_true")

    p = sub.add_parser("bm25", help="BM25 retrieval with bm25s: run.trec + metrics.json")
    p.set_defaults(func=cmd_bm25)
    p.add_argument("--data", required=True, help="dataset folder or name under $RESEARCH_DATA_DIR")
    p.add_argument("--split", default="test")
    p.add_argument("--out", required=True)
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--k1", type=float, default=1.5)
    p.add_argument("--b", type=float, default=0.75)
