"""Exact dense search with faiss, and writing a run with its metrics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from research.data.trec import Qrels, Run, write_run
from research.eval.metrics import MetricsResult, compute_metrics
from research.io import write_json

DEFAULT_METRICS = ("nDCG@10", "RR@10", "R@100", "AP@100")


@dataclass
class Evaluation:
    run: Run
    metrics: MetricsResult

    def summary(self) -> str:
        return "  ".join(f"{name} {value:.4f}" for name, value in self.metrics.aggregate.items())


def dense_search(
    query_embeddings: torch.Tensor, doc_embeddings: torch.Tensor, query_ids: list[str], doc_ids: list[str],
    k: int = 100, query_batch: int = 4096,
) -> Run:
    """Top-``k`` documents by inner product (exact, ``faiss.IndexFlatIP``), searched in query batches."""
    try:
        import faiss
    except ImportError:
        raise ImportError("faiss is missing: install the 'cpu' extra (faiss-cpu) or the 'gpu' extra (faiss-gpu)") from None
    docs = np.ascontiguousarray(doc_embeddings.detach().float().cpu().numpy())
    index = faiss.IndexFlatIP(docs.shape[1])
    index.add(docs)
    queries = np.ascontiguousarray(query_embeddings.detach().float().cpu().numpy())
    k = min(k, len(doc_ids))
    run: Run = {}
    for start in range(0, len(query_ids), query_batch):
        scores, indices = index.search(queries[start:start + query_batch], k)
        for qid, row_scores, row_idx in zip(query_ids[start:start + query_batch], scores, indices):
            run[qid] = {doc_ids[i]: float(s) for s, i in zip(row_scores, row_idx) if i >= 0}
    return run


def evaluate_run(run: Run, qrels: Qrels, metrics=DEFAULT_METRICS, relevance_level: int = 1) -> Evaluation:
    return Evaluation(run, compute_metrics(run, qrels, metrics=tuple(metrics), relevance_level=relevance_level))


def save_evaluation(out_dir: str | Path, evaluation: Evaluation, tag: str = "research", **info) -> None:
    """``run.trec``, ``metrics.json`` (aggregate + info) and ``per_query.json``, each written atomically."""
    out_dir = Path(out_dir)
    write_run(out_dir / "run.trec", evaluation.run, tag=tag)
    result = evaluation.metrics
    write_json(out_dir / "per_query.json", result.per_query)
    write_json(out_dir / "metrics.json", {
        **result.aggregate, "num_queries": result.num_queries,
        "skipped_queries_without_relevant": len(result.skipped_queries), **info,
    })
