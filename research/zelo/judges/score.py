"""Pointwise scorers as pairwise judges: :class:`ScoreJudge` and its two builders, :func:`bm25_judge` and :func:`model_judge`.

Any scorer of the framework (the :class:`research.models.scorers.PairScorer` protocol: cross-encoder, bi-encoder
through :class:`~research.models.scorers.BiEncoderScorer`, LLM reranker, or :class:`BM25Scorer` over the index of
:mod:`research.retrieval.bm25`) is turned pairwise by ``p = sigmoid((s_a - s_b) / temperature)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.special import expit
from torch import Tensor

from research.retrieval.bm25 import BM25Config, BM25Index
from research.zelo.judges.base import Judge, JudgeError, check_lengths

if TYPE_CHECKING:
    from research.data.beir import RetrievalDataset
    from research.models.scorers import PairScorer


class ScoreJudge(Judge):
    """A pointwise scorer as a pairwise judge: ``p = sigmoid((s_a - s_b) / temperature)``.

    Each distinct (query, document) text pair is scored once per call (a document meets ~2 x cycles others).
    ``temperature`` is in the scorer's units: e.g. ~1 for BM25, ~0.05 for cosine similarities, ~1 for logits.
    """

    def __init__(self, scorer: PairScorer, temperature: float = 1.0, name: str = "scorer", batch_size: int = 32) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.scorer, self.temperature, self.name, self.batch_size = scorer, float(temperature), name, batch_size

    def scores(self, queries: Sequence[str], documents: Sequence[str]) -> dict[tuple[str, str], float]:
        unique = list(dict.fromkeys(zip(queries, documents)))
        if not unique:
            return {}
        values = self.scorer.score_pairs([q for q, _ in unique], [d for _, d in unique], self.batch_size)
        values = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
        if values.shape != (len(unique),) or not torch.isfinite(values).all():
            raise JudgeError(f"judge {self.name}: scorer {type(self.scorer).__name__} returned {tuple(values.shape)} "
                             f"scores (non-finite or not one per pair)")
        return dict(zip(unique, values.tolist()))

    def judge_pairs(self, queries: Sequence[str], docs_a: Sequence[str], docs_b: Sequence[str]) -> list[float]:
        check_lengths(queries, docs_a, docs_b)
        scores = self.scores([*queries, *queries], [*docs_a, *docs_b])
        diff = np.array([scores[(q, a)] - scores[(q, b)] for q, a, b in zip(queries, docs_a, docs_b)], dtype=float)
        return [float(p) for p in expit(diff / self.temperature)]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "scorer": type(self.scorer).__name__, "temperature": self.temperature}


class BM25Scorer:
    """BM25 (a :class:`~research.retrieval.bm25.BM25Index` of the corpus) of any query against documents of that corpus.

    Judges see texts, not ids, so a document is found by its text (``Document.full_text``); a query's scores of the
    whole corpus are kept, because each query meets its candidates in many pairs.
    """

    def __init__(self, data: RetrievalDataset, config: BM25Config | None = None) -> None:
        self.bm25 = BM25Index(data, config)
        self.config = self.bm25.config
        self.index = {data.corpus[doc_id].full_text: i for i, doc_id in enumerate(self.bm25.doc_ids)}
        self._query_scores: dict[str, np.ndarray] = {}

    def _scores_of(self, query: str) -> np.ndarray:
        if query not in self._query_scores:
            if len(self._query_scores) > 10_000:  # bounds memory: corpus-sized arrays, one per query
                self._query_scores.clear()
            self._query_scores[query] = self.bm25.scores(query)
        return self._query_scores[query]

    def score_pairs(self, queries: list[str], documents: list[str], batch_size: int = 32) -> Tensor:
        out = []
        for query, document in zip(queries, documents, strict=True):
            if document not in self.index:
                raise JudgeError("BM25 judge: a document is not in the corpus the judge was built on")
            out.append(self._scores_of(query)[self.index[document]])
        return torch.tensor(out, dtype=torch.float32)


def bm25_judge(data: RetrievalDataset, temperature: float = 1.0, name: str = "bm25", **bm25) -> ScoreJudge:
    """A :class:`ScoreJudge` over :class:`BM25Scorer`; ``bm25`` are :class:`~research.retrieval.bm25.BM25Config` fields."""
    return ScoreJudge(BM25Scorer(data, BM25Config(**bm25)), temperature=temperature, name=name)


def model_judge(path: str | Path, device: str = "cpu", max_length: int | None = None, trust_remote_code: bool = False,
                name: str | None = None, temperature: float = 1.0, batch_size: int = 32) -> ScoreJudge:
    """A :class:`ScoreJudge` over any scorer directory :func:`research.models.scorers.load_scorer` recognises."""
    from research.models.scorers import ScorerOptions, load_scorer

    options = ScorerOptions(max_length=max_length, trust_remote_code=bool(trust_remote_code), device=str(device))
    scorer = load_scorer(path, options)
    return ScoreJudge(scorer, temperature=temperature, name=name or f"model:{Path(str(path)).name}",
                      batch_size=batch_size)
