"""``research evaluate`` (dense retrieval) and ``research bm25``: a run file and its metrics."""

from __future__ import annotations

import argparse
import time

from research.cli.options import (
    add_precision,
    add_quiet,
    add_scoring,
    add_slice,
    describe_slice,
    scoring,
    slice_corpus,
    slice_info,
    slice_queries,
    wrote_evaluation,
)


def print_metrics(title: str, metrics: dict[str, float]) -> None:
    print(f"{title}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


def evaluation_trainer(precision: str = "32-true", callbacks=None, devices: int = 1):
    """A quiet Trainer for evaluation commands (progress: ``callbacks``, not Lightning's bar); ``devices`` > 1: DDP,
    each rank encoding its share of the corpus shards (research.training.embedding_cache)."""
    import lightning as L

    return L.Trainer(accelerator="auto", devices=devices, strategy="ddp" if devices > 1 else "auto",
                     precision=precision, logger=False, enable_checkpointing=False,
                     enable_model_summary=False, use_distributed_sampler=False, enable_progress_bar=False,
                     callbacks=callbacks)


def load_slice(args: argparse.Namespace, lazy_corpus: bool = False):
    """The ``--data`` split, cut to ``--max-queries`` / ``--max-docs`` when given; ``lazy_corpus`` reads the corpus
    through its byte-offset index instead of a dict of every text."""
    from research.data.beir import load_dataset

    data = slice_queries(load_dataset(args.data, args.split, lazy_corpus=lazy_corpus), args.max_queries)
    return slice_corpus(data, args.max_docs)


def cmd_evaluate(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    # before torch and the model: a wrong --data fails in a second, not after loading weights
    data = load_slice(args, lazy_corpus=True)
    from datamodules.retrieval import RetrievalDataModule
    from modules.bi_encoder import BiEncoderModule
    from research.cli.stages import EvaluationProgress
    from research.eval.evaluation import save_evaluation

    module = BiEncoderModule(model=args.model, document_max_length=args.max_length, query_max_length=args.max_length,
                             eval_top_k=args.top_k, trust_remote_code=args.trust_remote_code)
    datamodule = RetrievalDataModule(args.data, train_split=None, eval_split=args.split,
                                     eval_batch_size=args.batch_size, **scoring(args))
    datamodule.eval_data = data  # the (sliced) split loaded above: setup() keeps a loaded eval_data
    trainer = evaluation_trainer(args.precision, [EvaluationProgress()], args.devices)
    trainer.test(module, datamodule=datamodule, verbose=False)
    if trainer.global_rank != 0:  # every rank has the same evaluation: rank 0 writes it
        return
    evaluation = module.last_evaluation
    save_evaluation(args.out, evaluation, tag="dense", model=str(args.model), data=str(args.data), split=args.split,
                    **scoring(args), **slice_info(args, data),
                    seconds=round(time.perf_counter() - started, 2))
    print_metrics(f"{args.model} on {args.data}/{args.split}{describe_slice(args, data)}", evaluation.metrics.aggregate)
    print(f"{wrote_evaluation(args.out)} ({time.perf_counter() - started:.0f} s)")


def cmd_bm25(args: argparse.Namespace) -> None:
    from research.eval.evaluation import evaluate_run, save_evaluation
    from research.retrieval.bm25 import BM25Config, bm25_search

    started = time.perf_counter()
    data = load_slice(args, lazy_corpus=True)
    run = bm25_search(data, k=args.top_k, config=BM25Config(k1=args.k1, b=args.b), index_dir=args.index_dir)
    evaluation = evaluate_run(run, data.qrels, **scoring(args))
    save_evaluation(args.out, evaluation, tag="bm25", data=str(args.data), split=args.split, k1=args.k1, b=args.b,
                    **scoring(args), **slice_info(args, data),
                    seconds=round(time.perf_counter() - started, 2))
    print_metrics(f"BM25 on {args.data}/{args.split}{describe_slice(args, data)}", evaluation.metrics.aggregate)
    print(f"{wrote_evaluation(args.out)} ({time.perf_counter() - started:.0f} s)")


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="dense retrieval: encode, exact faiss search, run.trec + metrics.json",
                       description="Encode the split's judged queries and the corpus with a bi-encoder, search exactly "
                                   "(faiss), write OUT/run.trec, OUT/metrics.json and OUT/per_query.json.")
    p.set_defaults(func=cmd_evaluate)
    p.add_argument("--model", required=True, help="model directory, packaged name or hub id")
    p.add_argument("--data", required=True, help="dataset folder or name under $RESEARCH_DATA_DIR")
    p.add_argument("--split", default="test", help="qrels split to evaluate on")
    p.add_argument("--out", required=True, help="output directory for run.trec, metrics.json and per_query.json")
    p.add_argument("--top-k", type=int, default=100, help="documents retrieved per query")
    p.add_argument("--batch-size", type=int, default=16, help="texts per encoding batch (default 16: small length-sorted batches are fastest on CPU; raise it on a GPU)")
    p.add_argument("--max-length", type=int, default=None,
                   help="override query and document max length in tokens (default: the model's)")
    add_precision(p, "Lightning precision: ")
    p.add_argument("--devices", type=int, default=1,
                   help="processes (DDP when > 1): each encodes its share of the corpus shards (default 1)")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model folder's own code")
    add_scoring(p)
    add_slice(p)
    add_quiet(p)

    p = sub.add_parser("bm25", help="BM25 retrieval with bm25s: run.trec + metrics.json",
                       description="BM25 (bm25s, Lucene variant, English stopwords and stemmer) over the corpus for "
                                   "the split's judged queries; writes OUT/run.trec, OUT/metrics.json and "
                                   "OUT/per_query.json.")
    p.set_defaults(func=cmd_bm25)
    p.add_argument("--data", required=True, help="dataset folder or name under $RESEARCH_DATA_DIR")
    p.add_argument("--split", default="test", help="qrels split to evaluate on")
    p.add_argument("--out", required=True, help="output directory for run.trec, metrics.json and per_query.json")
    p.add_argument("--top-k", type=int, default=100, help="documents retrieved per query")
    p.add_argument("--k1", type=float, default=1.5, help="BM25 term-frequency saturation")
    p.add_argument("--b", type=float, default=0.75, help="BM25 length normalisation")
    p.add_argument("--index-dir", default=None, metavar="DIR",
                   help="save the BM25 index here, or memory-map the one saved there for the same corpus and "
                        "settings instead of indexing again (default: index in memory, save nothing)")
    add_scoring(p)
    add_slice(p)
    add_quiet(p)
