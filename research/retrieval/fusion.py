"""Score interpolation of a re-ranker with its first stage (Wang et al., ICTIR 2021, "BERT-based dense retrievers
require interpolation with BM25").

Each query's scores from both runs are z-normalised (mean 0, std 1 over that query's candidates) so that BM25's
unbounded scores and a cross-encoder's logits share a scale; the fused score is
``weight * z(reranked) + (1 - weight) * z(first_stage)``. A candidate missing from the first stage gets that query's
lowest first-stage z-score. ``weight`` is fixed before looking at test data (0.5, equal weight, is the default), or
chosen on validation queries by :func:`choose_weight`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from research.data.trec import Qrels, Run

WEIGHT_GRID = tuple(round(0.1 * i, 1) for i in range(11))  # 0, 0.1, ..., 1: 0 is the first stage alone, 1 the re-ranker


def zscore(scores: Mapping[str, float]) -> dict[str, float]:
    """Per-query standardisation; a query whose scores are all equal maps to 0 everywhere."""
    if not scores:
        return {}
    values = list(scores.values())
    mean = math.fsum(values) / len(values)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))
    if std == 0.0:
        return dict.fromkeys(scores, 0.0)
    return {doc_id: (value - mean) / std for doc_id, value in scores.items()}


def interpolate(reranked: Mapping[str, Mapping[str, float]], first_stage: Mapping[str, Mapping[str, float]],
                weight: float = 0.5) -> Run:
    """The re-ranked run's documents, scored ``weight * z(reranked) + (1 - weight) * z(first_stage)`` per query."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"interpolation weight must be in [0, 1], got {weight}")
    fused: Run = {}
    for query_id, scores in reranked.items():
        z_reranked = zscore(scores)
        z_first = zscore(first_stage.get(query_id, {}))
        floor = min(z_first.values(), default=0.0)
        fused[query_id] = {doc_id: weight * z + (1.0 - weight) * z_first.get(doc_id, floor)
                           for doc_id, z in z_reranked.items()}
    return fused


def choose_weight(reranked: Mapping[str, Mapping[str, float]], first_stage: Mapping[str, Mapping[str, float]],
                  qrels: Qrels, metric: str = "nDCG@10", weights: tuple[float, ...] = WEIGHT_GRID,
                  relevance_level: int = 1, queries_without_relevant: str = "exclude") -> tuple[float, dict[float, float]]:
    """The weight of ``weights`` whose interpolation has the best ``metric`` on these (validation) queries, and the curve.

    A tie goes to the larger weight (more of the re-ranker). Pass validation queries only: the point is that the test
    split never sees the choice.
    """
    from research.eval.evaluation import evaluate_run

    if not weights:
        raise ValueError("choose_weight needs at least one weight")
    curve = {w: evaluate_run(interpolate(reranked, first_stage, w), qrels, (metric,), relevance_level=relevance_level,
                             queries_without_relevant=queries_without_relevant).metrics.aggregate[metric]
             for w in weights}
    return max(curve, key=lambda w: (curve[w], w)), curve
