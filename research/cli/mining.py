"""``research mine`` (hard negatives), ``research score`` (teacher scores) and ``research run-to-groups``.

All three write the groups JSONL that ``RetrievalDataModule(groups_file=...)`` reads (``score`` also scores plain
pair lists); see :mod:`research.retrieval.mining` and docs/mining.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from research.errors import DataFormatError, ResearchError
from research.models.runtime import PRECISIONS, inference_autocast


def _device(name: str) -> str:
    import torch

    return name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def _load_scorer(model: str, args: argparse.Namespace, device: str):
    from research.retrieval.rerank import ScorerOptions, load_scorer

    return load_scorer(model, ScorerOptions(max_length=args.max_length, trust_remote_code=args.trust_remote_code,
                                            device=device))


def cmd_mine(args: argparse.Namespace) -> None:
    import numpy as np

    from research.data.beir import load_dataset
    from research.models.bi_encoder import BiEncoder
    from research.retrieval.mining import (
        DenseIndex,
        MiningConfig,
        fingerprint,
        mine,
        parse_rank_window,
        positives_and_excluded,
        prepare_progress,
    )

    rank_min, rank_max = parse_rank_window(args.rank_window)
    config = MiningConfig(depth=args.depth, rank_min=rank_min, rank_max=rank_max, margin=args.margin,
                          relative_margin=args.relative_margin, max_score=args.max_score,
                          num_negatives=args.num_negatives, max_rescore_score=args.max_rescore_score)
    if args.max_rescore_score is not None and args.rescorer is None:
        raise ResearchError("--max-rescore-score needs --rescorer")
    if args.query_batch < 1:
        raise ResearchError(f"--query-batch must be >= 1, got {args.query_batch}")
    device = _device(args.device)
    started = time.perf_counter()
    data = load_dataset(args.data, args.split)
    positives, excluded = positives_and_excluded(data.qrels, args.relevance_level)
    query_ids = [qid for qid in data.queries if qid in positives]
    if not query_ids:
        raise ResearchError(f"{args.data}/{args.split}: no query has a positive (relevance >= {args.relevance_level})")
    doc_ids = list(data.corpus)
    out = Path(args.out)
    progress = None
    if not args.no_resume:
        progress = out.with_name(out.name + ".progress")
        prepare_progress(progress, fingerprint(model=str(args.model), data=str(data.path), split=args.split,
                                               config=config, query_batch=args.query_batch, rescorer=str(args.rescorer),
                                               relevance_level=args.relevance_level, max_length=args.max_length,
                                               precision=args.precision, docs=len(doc_ids), queries=len(query_ids)))
    encoder = BiEncoder.from_pretrained(args.model, trust_remote_code=args.trust_remote_code,
                                        query_max_length=args.max_length, document_max_length=args.max_length)
    encoder = encoder.to(device).eval()
    cached = progress / "corpus.npy" if progress is not None else None
    if cached is not None and cached.is_file():
        doc_embeddings = np.load(cached)
        print(f"corpus embeddings: resumed from {cached}")
    else:
        with inference_autocast(args.precision, device):
            doc_embeddings = encoder.encode_texts([data.corpus[d].full_text for d in doc_ids], is_query=False,
                                                  batch_size=args.batch_size).numpy()
        if cached is not None:
            tmp = cached.with_name(".corpus.tmp.npy")
            np.save(tmp, doc_embeddings)
            tmp.replace(cached)
    encoded = time.perf_counter()
    index = DenseIndex(doc_embeddings, doc_ids)
    del doc_embeddings

    def encode(ids: list[str]):
        def run():
            with inference_autocast(args.precision, device):
                return encoder.encode_texts([data.queries[q] for q in ids], is_query=True,
                                            batch_size=args.batch_size).numpy()
        return run

    batches = ((query_ids[s:s + args.query_batch], encode(query_ids[s:s + args.query_batch]))
               for s in range(0, len(query_ids), args.query_batch))

    rescorer = None
    if args.rescorer is not None:
        scorer = _load_scorer(args.rescorer, args, device)

        def rescorer(qids: list[str], docs: list[list[str]]) -> list[list[float]]:
            flat_q = [data.queries[q] for q, ds in zip(qids, docs) for _ in ds]
            flat_d = [data.corpus[d].full_text for ds in docs for d in ds]
            if not flat_q:
                return [[] for _ in qids]
            with inference_autocast(args.precision, device):
                scores = scorer.score_pairs(flat_q, flat_d, args.rescore_batch_size).float().tolist()
            out, at = [], 0
            for ds in docs:
                out.append(scores[at:at + len(ds)])
                at += len(ds)
            return out

    def on_batch(number: int, total) -> None:
        if args.verbose:
            print(f"  batch {number + 1}: {total.queries} queries, {total.kept} negatives", flush=True)

    stats = mine(index, batches, positives, excluded, config, out=out, rescorer=rescorer, progress_dir=progress,
                 on_batch=on_batch)
    print(stats.table())
    print(f"wrote {out} ({stats.queries} groups; corpus encoded in {encoded - started:.0f} s, "
          f"total {time.perf_counter() - started:.0f} s)")


def cmd_score(args: argparse.Namespace) -> None:
    from research.data.beir import load_dataset
    from research.io import write_jsonl
    from research.retrieval.mining import read_score_input, score_records

    device = _device(args.device)
    kind, records = read_score_input(args.pairs)
    data = load_dataset(args.data, None)
    for line, record in records:
        qid = str(record["query_id"])
        if qid not in data.queries:
            raise DataFormatError(args.pairs, line, "query_id", f"unknown query '{qid}'")
        fields = ("doc_id",) if kind == "pairs" else ("positives", "negatives")
        for name in fields:
            ids = [record[name]] if name == "doc_id" else record.get(name, [])
            for doc_id in ids if isinstance(ids, list) else []:
                if str(doc_id) not in data.corpus:
                    raise DataFormatError(args.pairs, line, name, f"unknown document '{doc_id}'")
    scorer = _load_scorer(args.model, args, device)

    def score(qids: list[str], dids: list[str]) -> list[float]:
        with inference_autocast(args.precision, device):
            return scorer.score_pairs([data.queries[q] for q in qids], [data.corpus[d].full_text for d in dids],
                                      args.batch_size).float().tolist()

    started = time.perf_counter()
    count = write_jsonl(args.out, score_records(kind, records, score, args.pairs))
    print(f"scored {count} {kind} with {args.model} ({type(scorer).__name__}) in {time.perf_counter() - started:.0f} s; "
          f"wrote {args.out}")


def cmd_run_to_groups(args: argparse.Namespace) -> None:
    from research.data.beir import load_dataset
    from research.data.trec import read_run
    from research.io import iter_lines, write_jsonl
    from research.retrieval.mining import MiningConfig, parse_rank_window, run_to_groups

    rank_min, rank_max = parse_rank_window(args.rank_window)
    config = MiningConfig(depth=10**9, rank_min=rank_min, rank_max=rank_max, max_score=args.max_score,
                          num_negatives=args.num_negatives)
    data = load_dataset(args.data, args.split)
    run = read_run(args.run)
    if not run:
        raise DataFormatError(args.run, None, None, "no run lines")
    records, stats, missing = run_to_groups(run, data.qrels, config, args.relevance_level)
    for record in records:
        for doc_id in record["negatives"]:
            if doc_id not in data.corpus:
                line = next((n for n, text in iter_lines(args.run) if text.split()[0:3:2] == [record["query_id"], doc_id]), None)
                raise DataFormatError(args.run, line, "doc_id", f"unknown document '{doc_id}' (query '{record['query_id']}'), "
                                      f"not in {data.path / 'corpus.jsonl'}")
    write_jsonl(args.out, records)
    print(stats.table())
    print(f"wrote {args.out} ({len(records)} groups; {missing} judged queries have no row in the run)")


def _window(text: str) -> str:
    from research.retrieval.mining import parse_rank_window

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
    p.add_argument("--split", default="train")
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
    p.add_argument("--relevance-level", type=int, default=1, help="qrels grade from which a document is a positive")
    p.add_argument("--query-batch", type=int, default=1024, help="queries searched at once (bounds memory)")
    p.add_argument("--batch-size", type=int, default=128, help="encoding batch size")
    p.add_argument("--rescore-batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=None, help="override the models' max length (tokens)")
    p.add_argument("--precision", choices=PRECISIONS, default="32-true")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-resume", action="store_true", help="do not keep or reuse per-batch progress (OUT.progress/)")
    p.add_argument("--verbose", action="store_true", help="print progress per query batch")
    p.add_argument("--trust-remote-code", action="store_true")

    p = sub.add_parser("score", help="teacher scores for (query, document) pairs or groups with any scoring model",
                       description="PAIRS is JSONL of {query_id, doc_id} (adds 'score') or of groups {query_id, positives, "
                                   "negatives} (fills positive_scores / negative_scores); ids refer to --data.")
    p.set_defaults(func=cmd_score)
    p.add_argument("--model", required=True, help="scoring model directory (cross-encoder, bi-encoder, LLM reranker)")
    p.add_argument("--pairs", required=True, help="pairs or groups JSONL")
    p.add_argument("--data", required=True, help="dataset folder or name giving the query and document texts")
    p.add_argument("--out", required=True, help="output JSONL (written atomically)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--precision", choices=PRECISIONS, default="32-true")
    p.add_argument("--device", default="auto")
    p.add_argument("--trust-remote-code", action="store_true")

    p = sub.add_parser("run-to-groups", help="training groups from any TREC run plus qrels",
                       description="Positives from the split's qrels; negatives from the run's ranking (every labelled "
                                   "document excluded), optionally within a rank window.")
    p.set_defaults(func=cmd_run_to_groups)
    p.add_argument("--run", required=True, help="TREC run file")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--out", required=True)
    p.add_argument("--rank-window", type=_window, default=None, metavar="FIRST:LAST")
    p.add_argument("--max-score", type=float, default=None, help="keep negatives whose run score is <= S")
    p.add_argument("--num-negatives", type=int, default=None)
    p.add_argument("--relevance-level", type=int, default=1)
