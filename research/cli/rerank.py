"""``research rerank``: rescore a candidate run's top-k with a saved model (cross-encoder, bi-encoder, ...)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

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
from research.cli.retrieval import print_metrics
from research.errors import ResearchError
from research.models.runtime import inference_autocast, resolve_device

CHOICE_METRIC = "nDCG@10"  # what --interpolate-on maximises


def cmd_rerank(args: argparse.Namespace) -> None:
    from research.eval.evaluation import evaluate_run, save_evaluation
    from research.models.scorers import ScorerOptions, load_scorer

    if args.top_k < 1:
        raise ResearchError(f"--top-k must be >= 1, got {args.top_k}")
    if args.interpolate_on is not None and args.interpolate_on == args.split:
        raise ResearchError(f"--interpolate-on {args.interpolate_on}: the weight must be chosen on another split than "
                            f"the one re-ranked (--split {args.split}), or the choice sees the figures it reports")
    device = resolve_device(args.device)
    started = time.perf_counter()
    scorer = load_scorer(args.model, ScorerOptions(max_length=args.max_length, trust_remote_code=args.trust_remote_code,
                                                   device=device))
    set_exit_rule(scorer, args.exit_layer, args.adaptive_exit)
    weight, choice = args.interpolate, {}
    bm25_indexes: dict = {}  # the whole corpus's BM25 index, built once for both splits of --interpolate-on
    if args.interpolate_on is not None:  # first: a missing validation split fails before the long re-rank
        weight, choice = choose_interpolation(args, scorer, device, bm25_indexes)
        set_exit_rule(scorer, args.exit_layer, args.adaptive_exit)  # exit counts: the reported split's pairs only
    data, candidates, run = rerank_split(args, args.split, scorer, device, bm25_indexes)
    first_stage = evaluate_run(candidates, data.qrels, **scoring(args))
    evaluation = evaluate_run(run, data.qrels, **scoring(args))
    exits = exit_report(scorer, args.exit_layer, args.adaptive_exit)
    info = dict(data=str(args.data), split=args.split, candidates=str(args.candidates), top_k=args.top_k,
                **scoring(args), **slice_info(args, data))
    save_evaluation(args.out, evaluation, tag="rerank", model=str(args.model), scorer=type(scorer).__name__,
                    precision=args.precision, candidates_metrics=first_stage.metrics.aggregate, **info,
                    seconds=round(time.perf_counter() - started, 2), **exits)
    print_metrics(f"candidates ({args.candidates}, top {args.top_k}){describe_slice(args, data)}",
                  first_stage.metrics.aggregate)
    print_metrics(f"re-ranked by {args.model}", evaluation.metrics.aggregate)
    if exits:
        print(f"exit: {exits['mean_layers_run']:.2f} decoder blocks per document on average; pairs per exit layer "
              + ", ".join(f"{layer}: {count}" for layer, count in exits["exit_counts"].items()))
    print(f"{wrote_evaluation(args.out)} ({time.perf_counter() - started:.0f} s)")
    if weight is not None:
        from research.retrieval.fusion import interpolate
        from research.runs.layout import INTERPOLATED_DIR

        fused = evaluate_run(interpolate(run, candidates, weight), data.qrels, **scoring(args))
        fused_dir = Path(args.out) / INTERPOLATED_DIR
        save_evaluation(fused_dir, fused, tag="interpolated", model=str(args.model), **info,
                        weight=weight, normalization="per-query z-score", **choice)
        print_metrics(f"interpolated ({weight:g} x re-ranker + {1 - weight:g} x candidates"
                      + (f", weight chosen on {args.interpolate_on})" if choice else ")"), fused.metrics.aggregate)
        print(wrote_evaluation(fused_dir))


def rerank_split(args: argparse.Namespace, split: str, scorer, device, bm25_indexes: dict | None = None):
    """One split's (sliced) data, its candidates (top ``--top-k``) and the re-ranked run. ``bm25_indexes`` keeps the
    BM25 index of the whole corpus for the next split (a sliced corpus depends on its split's qrels: never kept)."""
    from research.data.beir import load_dataset
    from research.data.trec import truncate_run
    from research.retrieval.bm25 import BM25Index
    from research.retrieval.rerank import BM25, candidate_run, rerank_run

    data = slice_queries(load_dataset(args.data, split), args.max_queries)
    query_ids = list(data.judged_queries)
    if args.candidates == BM25:  # computed over the (sliced) corpus
        data = slice_corpus(data, args.max_docs)
        index = None
        if bm25_indexes is not None and args.max_docs is None:
            index = bm25_indexes.get("corpus") or bm25_indexes.setdefault("corpus", BM25Index(data))
        candidates = truncate_run(candidate_run(args.candidates, data, args.top_k, query_ids, bm25_index=index),
                                  args.top_k)
    else:  # a run file: a sliced corpus keeps every candidate of the kept queries
        candidates = truncate_run(candidate_run(args.candidates, data, args.top_k, query_ids), args.top_k)
        if args.max_queries is not None:
            candidates = {q: candidates[q] for q in query_ids if q in candidates}
        data = slice_corpus(data, args.max_docs, keep=(d for q in query_ids for d in candidates.get(q, {})))
    with inference_autocast(args.precision, device):
        run = rerank_run(scorer, data, candidates, top_k=args.top_k, batch_size=args.batch_size, query_ids=query_ids)
    return data, candidates, run


def choose_interpolation(args: argparse.Namespace, scorer, device, bm25_indexes: dict | None = None
                         ) -> tuple[float, dict]:
    """``--interpolate-on SPLIT``: that split re-ranked the same way, and the weight of the best nDCG@10 on it."""
    from research.retrieval.fusion import choose_weight

    started = time.perf_counter()
    data, candidates, run = rerank_split(args, args.interpolate_on, scorer, device, bm25_indexes)
    weight, curve = choose_weight(run, candidates, data.qrels, metric=CHOICE_METRIC, **scoring(args))
    print(f"interpolation weight chosen on {args.interpolate_on} ({len(data.judged_queries)} queries, "
          f"{CHOICE_METRIC}): {weight:g}; curve " + ", ".join(f"{w:g}: {v:.4f}" for w, v in curve.items())
          + f" ({time.perf_counter() - started:.0f} s)")
    return weight, {"weight_chosen_on": args.interpolate_on, "weight_metric": CHOICE_METRIC,
                    "weight_curve": {f"{w:g}": v for w, v in curve.items()}}


def set_exit_rule(scorer, exit_layer: int | None, adaptive_exit: float | None) -> None:
    """``--exit-layer`` / ``--adaptive-exit``: the layer-wise LLM reranker's exit rule; refused for other scorers."""
    if exit_layer is None and adaptive_exit is None:
        return
    if not hasattr(scorer, "set_exit"):
        raise ResearchError(f"--exit-layer / --adaptive-exit need a layer-wise LLM reranker, not {type(scorer).__name__}")
    try:
        scorer.set_exit(exit_layer, adaptive_exit)
    except ValueError as err:
        raise ResearchError(str(err)) from None
    scorer.exit_counts.clear()


def exit_report(scorer, exit_layer: int | None, adaptive_exit: float | None) -> dict:
    """What metrics.json records of the exit rule: the flags, pairs per exit layer, mean decoder blocks per pair."""
    if exit_layer is None and adaptive_exit is None:
        return {}
    counts = dict(sorted(scorer.exit_counts.items()))
    total = sum(counts.values())
    return {"exit_layer": scorer.config.exit_layer, "adaptive_exit": adaptive_exit,
            "calibrated": bool(scorer.config.calibration), "exit_counts": {str(k): v for k, v in counts.items()},
            "mean_layers_run": sum(layer * n for layer, n in counts.items()) / total if total else 0.0}


def register(sub) -> None:
    p = sub.add_parser("rerank", help="re-rank a candidate run's top-k with a saved model: run.trec + metrics.json",
                       description="Re-rank each judged query's top-k candidates with a saved model; the model kind "
                                   "(cross-encoder, bi-encoder, ...) is detected from its directory.")
    p.set_defaults(func=cmd_rerank)
    p.add_argument("--model", required=True, help="saved model directory (or packaged name / hub id)")
    p.add_argument("--data", required=True, help="dataset folder or name under $RESEARCH_DATA_DIR")
    p.add_argument("--split", default="test", help="qrels split whose judged queries are re-ranked")
    p.add_argument("--candidates", default="bm25", help="TREC run file of candidates, or 'bm25' to compute them now")
    p.add_argument("--top-k", type=int, default=100, help="candidates re-ranked per query")
    p.add_argument("--out", required=True, help="output directory for run.trec, metrics.json and per_query.json")
    p.add_argument("--batch-size", type=int, default=32, help="pairs scored per batch")
    p.add_argument("--max-length", type=int, default=None,
                   help="override the model's max length in tokens (default: the model's)")
    add_precision(p)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto, cuda when available)")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model folder's own code")
    p.add_argument("--exit-layer", type=int, default=None, metavar="K",
                   help="layer-wise LLM reranker: score at decoder layer K, a scored layer (default: the saved one)")
    p.add_argument("--adaptive-exit", type=float, default=None, metavar="THRESHOLD",
                   help="layer-wise LLM reranker: each document exits at the first scored layer (up to the exit layer) "
                        "whose calibrated |log-odds| >= THRESHOLD (0: the first scored layer; inf: the exit layer)")
    fused = p.add_mutually_exclusive_group()
    fused.add_argument("--interpolate", type=float, default=None, metavar="WEIGHT",
                       help="also write OUT/interpolated: WEIGHT x z(re-ranker) + (1 - WEIGHT) x z(candidates) per "
                            "query (default: not written)")
    fused.add_argument("--interpolate-on", default=None, metavar="SPLIT",
                       help="also write OUT/interpolated at the weight in 0, 0.1, ..., 1 with the best nDCG@10 on SPLIT "
                            "(a validation split of --data, re-ranked the same way; never the --split reported)")
    add_scoring(p)
    add_slice(p)
    add_quiet(p)
