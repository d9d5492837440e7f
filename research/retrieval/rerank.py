"""Re-ranking: rescore a candidate run's top-k documents with any pair scorer.

Candidates come from BM25 computed now or a TREC run file (:func:`candidate_run`); the scorer is any
:class:`research.models.scorers.PairScorer` (``research rerank`` loads one with
:func:`research.models.scorers.load_scorer`); the candidate pairs and their id checks are
:mod:`research.data.candidates`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from research.data.beir import RetrievalDataset
from research.data.candidates import candidate_pairs, pairs_to_run
from research.data.trec import Run, read_run
from research.errors import ResearchError
from research.models.scorers import PairScorer
from research.retrieval.bm25 import BM25Index, bm25_search

BM25 = "bm25"


def candidate_run(source: str, data: RetrievalDataset, top_k: int, query_ids: list[str],
                  bm25_index: BM25Index | None = None) -> Run:
    """Candidates for ``query_ids``: BM25 top-``top_k`` computed now (``source == "bm25"``; ``bm25_index``: an index of
    ``data``'s corpus built earlier) or a TREC run file."""
    if source == BM25:
        return bm25_search(data, k=top_k, query_ids=query_ids, show_progress=False, index=bm25_index)
    if not Path(source).is_file():
        raise ResearchError(f"candidates '{source}': neither 'bm25' nor a run file")
    return read_run(source)


def rerank_run(scorer: PairScorer, data: RetrievalDataset, candidates: Mapping[str, Mapping[str, float]], top_k: int = 100,
               batch_size: int = 32, query_ids: Iterable[str] | None = None) -> Run:
    """Rescore each query's top-``top_k`` candidates with ``scorer``; the run holds those documents only."""
    pairs = candidate_pairs(data, candidates, top_k, query_ids)
    if not pairs:
        return {}
    scores = scorer.score_pairs([data.queries[p.query_id] for p in pairs],
                                [data.corpus[p.doc_id].full_text for p in pairs], batch_size)
    if scores.shape != (len(pairs),):
        raise ValueError(f"{type(scorer).__name__}.score_pairs returned shape {tuple(scores.shape)}, expected ({len(pairs)},)")
    if not torch.isfinite(scores).all():
        raise ValueError(f"{type(scorer).__name__}.score_pairs returned non-finite scores")
    return pairs_to_run(pairs, scores.tolist())
