"""``research mine`` (hard negatives), ``research score`` (teacher scores) and ``research run-to-groups``.

All three write the groups JSONL that ``RetrievalDataModule(groups_file=...)`` reads (``score`` also scores plain
pair lists); the work is in :mod:`research.retrieval.mining`, :mod:`~research.retrieval.teacher_scores` and
:mod:`~research.retrieval.run_groups` (docs/mining.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from research.cli.options import (
    add_precision,
    add_quiet,
    add_relevance_level,
    add_slice,
    describe_slice,
    slice_corpus,
    slice_queries,
)
from research.errors import ResearchError
from research.models.runtime import resolve_device


def cmd_mine(args: argparse.Namespace) -> None:
    from research.data.beir import load_dataset
    from research.retrieval.mining import MiningModels, mine_dataset
    from research.retrieval.negatives import MiningConfig, parse_rank_window

    rank_min, rank_max = parse_rank_window(args.rank_window)
    config = MiningConfig(depth=args.depth, rank_min=rank_min, rank_max=rank_max, margin=args.margin,
                          relative_margin=args.relative_margin, max_score=args.max_score,
                          num_negatives=args.num_negatives, max_rescore_score=args.max_rescore_score)
    if args.max_rescore_score is not None and args.rescorer is None:
        raise ResearchError("--max-rescore-score needs --rescorer")
    if args.query_batch < 1:
        raise ResearchError(f"--query-batch must be >= 1, got {args.query_batch}")
    models = MiningModels(retriever=args.model, rescorer=args.rescorer, max_length=args.max_length,
                          trust_remote_code=args.trust_remote_code, precision=args.precision,
                          device=resolve_device(args.device), batch_size=args.batch_size,
                          rescore_batch_size=args.rescore_batch_size)
    started = time.perf_counter()
    data = slice_corpus(slice_queries(load_dataset(args.data, args.split, lazy_corpus=True), args.max_queries),
                        args.max_docs)  # the corpus through its offset index: no dict of every text

    def on_batch(number: int, total) -> None:
        if args.verbose:
            print(f"  batch {number + 1}: {total.queries} queries, {total.kept} negatives", flush=True)

    run = mine_dataset(data, models, config, args.out, relevance_level=args.relevance_level,
                       query_batch=args.query_batch, resume=not args.no_resume, on_batch=on_batch, report=print)
    print(run.stats.table())
    print(f"wrote {Path(args.out)} ({run.stats.queries} groups{describe_slice(args, data, '; {}')}; corpus encoded in "
          f"{run.corpus_seconds:.0f} s, total {time.perf_counter() - started:.0f} s)")


def cmd_score(args: argparse.Namespace) -> None:
    from research.data.beir import load_dataset
    from research.io import write_jsonl
    from research.models.scorers import ScorerOptions, load_scorer
    from research.retrieval.teacher_scores import check_score_ids, pair_score, read_score_input, score_records

    device = resolve_device(args.device)
    kind, records = read_score_input(args.pairs)
    if args.max_queries is not None:  # the records of the file's first N queries
        first = list(dict.fromkeys(str(record.get("query_id")) for _, record in records))[:args.max_queries]
        records = [(line, record) for line, record in records if str(record.get("query_id")) in set(first)]
    data = load_dataset(args.data, None)
    check_score_ids(kind, records, data, args.pairs)
    scorer = load_scorer(args.model, ScorerOptions(max_length=args.max_length, trust_remote_code=args.trust_remote_code,
                                                   device=device))
    score = pair_score(scorer, data, args.batch_size, args.precision, device)
    started = time.perf_counter()
    count = write_jsonl(args.out, score_records(kind, records, score, args.pairs))
    print(f"scored {count} {kind} with {args.model} ({type(scorer).__name__}) in {time.perf_counter() - started:.0f} s; "
          f"wrote {args.out}" + (f" (the first {args.max_queries} queries' records)" if args.max_queries else ""))


def cmd_run_to_groups(args: argparse.Namespace) -> None:
    from research.data.beir import load_dataset
    from research.retrieval.negatives import MiningConfig, parse_rank_window
    from research.retrieval.run_groups import write_run_groups

    rank_min, rank_max = parse_rank_window(args.rank_window)
    config = MiningConfig(depth=10**9, rank_min=rank_min, rank_max=rank_max, max_score=args.max_score,
                          num_negatives=args.num_negatives)
    data = load_dataset(args.data, args.split)
    count, stats, missing = write_run_groups(args.run, data, config, args.out, args.relevance_level)
    print(stats.table())
    print(f"wrote {args.out} ({count} groups; {missing} judged queries have no row in the run)")


def _window(text: str) -> str:
    from research.retrieval.negatives import parse_rank_window

    parse_rank_window(text)
    return text


def register(sub) -> None:
    p = sub.add_parser("mine", help="mine hard negatives with a bi-encoder (faiss, query batches): groups JSONL",
                       description="Encode the corpus once, retrieve each judged query's top documents in query batches, "
                                   "drop every labelled positive and filter by rank window, margins and score; "
                                   "optionally rescore with a cross-encoder (teacher scores, false-negative filter).")
    p.set_defaults(func=cmd_mine)
    p.add_argument("--model", required=True, help="bi-encoder directory, packaged name or hub id (the retriever)")
    p.add_argument("--data", required=True, help="dataset folder or name under $RESEARCH_DATA_DIR")
    p.add_argument("--split", default="train", help="qrels split giving the queries and their positives")
    p.add_argument("--out", required=True, help="groups JSONL (written atomically)")
    p.add_argument("--depth", type=int, default=100, help="documents retrieved per query")
    p.add_argument("--rank-window", type=_window, default=None, metavar="FIRST:LAST",
                   help="retrieval ranks (1-based, inclusive, positives counted) that may become negatives, e.g. 10:100")
    p.add_argument("--margin", type=float, default=None, help="keep negatives scoring < min positive score - MARGIN")
    p.add_argument("--relative-margin", type=float, default=None,
                   help="keep negatives scoring < min positive score * (1 - R)")
    p.add_argument("--max-score", type=float, default=None, help="keep negatives with retriever score <= S")
    p.add_argument("--num-negatives", type=int, default=None, help="keep the N best-ranked survivors per query")
    p.add_argument("--rescorer", default=None, help="scoring model directory (cross-encoder, LLM reranker, ...): "
                                                    "teacher scores of positives and negatives")
    p.add_argument("--max-rescore-score", type=float, default=None,
                   help="drop negatives the rescorer scores above T (likely false negatives)")
    add_relevance_level(p, "lowest qrels grade that makes a document a positive")
    p.add_argument("--query-batch", type=int, default=1024, help="queries searched at once (bounds memory)")
    p.add_argument("--batch-size", type=int, default=128, help="encoding batch size")
    p.add_argument("--rescore-batch-size", type=int, default=32, help="pairs per rescorer batch")
    p.add_argument("--max-length", type=int, default=None,
                   help="override the models' max length in tokens (default: the models')")
    add_precision(p)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto, cuda when available)")
    p.add_argument("--no-resume", action="store_true", help="do not keep or reuse per-batch progress (OUT.progress/)")
    p.add_argument("--verbose", action="store_true", help="print progress per query batch")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model folders' own code")
    add_slice(p)
    add_quiet(p)

    p = sub.add_parser("score", help="teacher scores for (query, document) pairs or groups with any scoring model",
                       description="PAIRS is JSONL of {query_id, doc_id} (adds 'score') or of groups {query_id, positives, "
                                   "negatives} (fills positive_scores / negative_scores); ids refer to --data.")
    p.set_defaults(func=cmd_score)
    p.add_argument("--model", required=True, help="scoring model directory (cross-encoder, bi-encoder, LLM reranker)")
    p.add_argument("--pairs", required=True, help="pairs or groups JSONL")
    p.add_argument("--data", required=True, help="dataset folder or name giving the query and document texts")
    p.add_argument("--out", required=True, help="output JSONL (written atomically)")
    p.add_argument("--batch-size", type=int, default=32, help="pairs per scoring batch")
    p.add_argument("--max-length", type=int, default=None,
                   help="override the model's max length in tokens (default: the model's)")
    add_precision(p)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto, cuda when available)")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model folder's own code")
    add_slice(p, docs=False, what="queries of PAIRS (their records only)")
    add_quiet(p)

    p = sub.add_parser("run-to-groups", help="training groups from any TREC run plus qrels",
                       description="Positives from the split's qrels; negatives from the run's ranking (every labelled "
                                   "document excluded), optionally within a rank window.")
    p.set_defaults(func=cmd_run_to_groups)
    p.add_argument("--run", required=True, help="TREC run file")
    p.add_argument("--data", required=True, help="dataset folder or name under $RESEARCH_DATA_DIR")
    p.add_argument("--split", default="train", help="qrels split giving the positives")
    p.add_argument("--out", required=True, help="groups JSONL (written atomically)")
    p.add_argument("--rank-window", type=_window, default=None, metavar="FIRST:LAST",
                   help="run ranks (1-based, inclusive) that may become negatives (default: all)")
    p.add_argument("--max-score", type=float, default=None,
                   help="keep negatives whose run score is <= S (default: no limit)")
    p.add_argument("--num-negatives", type=int, default=None, help="keep the N best-ranked per query (default: all)")
    add_relevance_level(p, "lowest qrels grade that makes a document a positive")
