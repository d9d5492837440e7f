"""The options several commands share, defined once: ``--quiet``, ``--precision``, ``--relevance-level``, the
``--max-queries`` / ``--max-docs`` slice of a dataset for a quick check, and the line saying what an evaluation wrote."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from research.data.beir import RetrievalDataset
from research.errors import ResearchError
from research.eval.evaluation import METRICS_FILE, PER_QUERY_FILE, RUN_FILE
from research.eval.metrics import QUERIES_WITHOUT_RELEVANT
from research.models.runtime import PRECISIONS


def add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true",
                        help="no progress on stderr (default: a live line on a terminal, one line per stage in logs)")


def add_precision(parser: argparse.ArgumentParser, what: str = "") -> None:
    parser.add_argument("--precision", choices=PRECISIONS, default=PRECISIONS[0],
                        help=f"{what}32-true: float32; bf16-mixed: bfloat16 autocast (default: {PRECISIONS[0]})")


def add_relevance_level(parser: argparse.ArgumentParser, text: str | None = None) -> None:
    parser.add_argument("--relevance-level", type=int, default=1, metavar="GRADE",
                        help=(text or "lowest qrels grade the metrics count as relevant (R@k, RR, AP; nDCG uses the "
                                      "grades); TREC DL counts 2") + " (default: 1)")


def add_scoring(parser: argparse.ArgumentParser) -> None:
    """How a command's metrics count: ``--relevance-level`` and ``--queries-without-relevant`` (see :func:`scoring`)."""
    add_relevance_level(parser)
    parser.add_argument("--queries-without-relevant", choices=QUERIES_WITHOUT_RELEVANT, default=QUERIES_WITHOUT_RELEVANT[0],
                        help="exclude: average over the queries with a relevant document (at --relevance-level); "
                             "trec_eval: over every qrels query, as trec_eval does (default: exclude)")


def scoring(args: argparse.Namespace) -> dict:
    """The keyword arguments of ``evaluate_run`` (and the fields of metrics.json) that :func:`add_scoring` set."""
    return {"relevance_level": args.relevance_level, "queries_without_relevant": args.queries_without_relevant}


def add_slice(parser: argparse.ArgumentParser, docs: bool = True, what: str = "judged queries") -> None:
    """``--max-queries N`` (and ``--max-docs N``): check a command on a slice of the data in seconds."""
    parser.add_argument("--max-queries", type=positive_int, default=None, metavar="N",
                        help=f"only the first N {what} in file order, as zelo votes --max-queries (default: all)")
    if docs:
        parser.add_argument("--max-docs", type=positive_int, default=None, metavar="N",
                            help="a corpus of N documents: every document judged for (or a candidate of) the kept "
                                 "queries, then the first others in file order (default: the whole corpus)")


def positive_int(text: str) -> int:
    """An argparse ``type``: a positive integer, or one error line saying what was given."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def slice_queries(data: RetrievalDataset, max_queries: int | None) -> RetrievalDataset:
    """The first ``max_queries`` judged queries (queries.jsonl order) and their qrels; ``None``: ``data`` itself."""
    if max_queries is None:
        return data
    kept = list(data.judged_queries)[:max_queries]
    if not kept:
        raise ResearchError(f"{data.path}: no judged queries in split '{data.split}' to keep with --max-queries")
    return replace(data, queries={q: data.queries[q] for q in kept}, qrels={q: data.qrels[q] for q in kept})


def slice_corpus(data: RetrievalDataset, max_docs: int | None, keep: Iterable[str] = ()) -> RetrievalDataset:
    """A corpus of ``max_docs`` documents: those judged for ``data``'s queries and ``keep`` (all of them, even when
    they are more), then the first others in corpus order; ``None``: ``data`` itself."""
    if max_docs is None:
        return data
    needed = {d for docs in data.qrels.values() for d in docs} | {d for d in keep if d in data.corpus}
    room = max(0, max_docs - len(needed))
    fill = [d for d in data.corpus if d not in needed][:room]
    chosen = needed | set(fill)
    return replace(data, corpus={d: doc for d, doc in data.corpus.items() if d in chosen})


def slice_info(args: argparse.Namespace, data: RetrievalDataset) -> dict[str, int]:
    """What metrics.json records of a slice (nothing when the command ran on the whole data)."""
    info: dict[str, int] = {}
    if getattr(args, "max_queries", None) is not None:
        info["max_queries"] = args.max_queries
    if getattr(args, "max_docs", None) is not None:
        info["max_docs"] = args.max_docs
        info["num_documents"] = len(data.corpus)
    return info


def describe_slice(args: argparse.Namespace, data: RetrievalDataset, around: str = " ({})") -> str:
    """``slice: 20 queries, 500 documents`` put into ``around``, or an empty string for the whole data."""
    parts = []
    if getattr(args, "max_queries", None) is not None:
        parts.append(f"{len(data.judged_queries)} queries")
    if getattr(args, "max_docs", None) is not None:
        parts.append(f"{len(data.corpus)} documents")
    return around.format(f"slice: {', '.join(parts)}") if parts else ""


def wrote_evaluation(out: str | Path) -> str:
    """``wrote OUT/run.trec, OUT/metrics.json, OUT/per_query.json``: every file of a saved evaluation."""
    out = Path(out)
    return "wrote " + ", ".join(str(out / name) for name in (RUN_FILE, METRICS_FILE, PER_QUERY_FILE))
