"""Candidate documents of a first-stage run, checked against a dataset: the top-k per query, as (query, document) pairs.

:func:`ranked_candidates` is the one place a candidate run's ids are checked against the dataset; re-ranking,
re-ranker training data and zELO pair collection all read their candidates through it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from research.data.beir import RetrievalDataset
from research.data.trec import Run, ranking
from research.errors import ResearchError


@dataclass(frozen=True)
class CandidatePair:
    """One candidate document of one query."""

    query_id: str
    doc_id: str


def ranked_candidates(data: RetrievalDataset, candidates: Mapping[str, Mapping[str, float]], query_id: str,
                      top_k: int) -> list[str]:
    """The query's top-``top_k`` candidate ids (trec_eval order; none if the run lacks the query), each in the dataset.

    Only the ids kept are checked: a run deeper than ``top_k`` may go on past the dataset's documents.
    """
    if query_id not in data.queries:
        raise ResearchError(f"candidate query '{query_id}' is not in {data.path / 'queries.jsonl'}")
    doc_ids = [doc_id for doc_id, _ in ranking(candidates.get(query_id, {}), top_k)]
    for doc_id in doc_ids:
        if doc_id not in data.corpus:
            raise ResearchError(f"candidate document '{doc_id}' (query '{query_id}') is not in {data.path / 'corpus.jsonl'}")
    return doc_ids


def candidate_pairs(data: RetrievalDataset, candidates: Mapping[str, Mapping[str, float]], top_k: int,
                    query_ids: Iterable[str] | None = None) -> list[CandidatePair]:
    """The top-``top_k`` candidates (trec_eval order) of each query, every id checked against the dataset.

    ``query_ids`` defaults to the candidate run's queries; a query without candidates contributes no pairs.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    query_ids = list(candidates if query_ids is None else query_ids)
    return [CandidatePair(query_id, doc_id) for query_id in query_ids
            for doc_id in ranked_candidates(data, candidates, query_id, top_k)]


def pairs_to_run(pairs: list[CandidatePair], scores: Iterable[float]) -> Run:
    """A run from pairs and their scores (same order)."""
    run: Run = {}
    for pair, score in zip(pairs, scores, strict=True):
        run.setdefault(pair.query_id, {})[pair.doc_id] = float(score)
    return run
