"""Re-ranking: rescore a candidate run's top-k documents with any pair scorer, and load scorers from saved directories.

A scorer is anything with ``score_pairs(queries, documents, batch_size) -> Tensor``: the cross-encoder, the
bi-encoder through :class:`BiEncoderScorer`, or an LLM reranker. ``research rerank`` finds which kind a model
directory holds through :data:`SCORER_LOADERS`, a list of loaders each keyed on a marker file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import Tensor

from research.data.trec import Run, ranking, read_run
from research.errors import ResearchError
from research.models.pretrained import resolve_model

if TYPE_CHECKING:  # datamodules imports this module
    from research.data.beir import RetrievalDataset


BM25 = "bm25"


@runtime_checkable
class PairScorer(Protocol):
    """Scores ``(queries[i], documents[i])`` pairs; higher is more relevant. Returns float32 ``[N]`` on the CPU."""

    def score_pairs(self, queries: list[str], documents: list[str], batch_size: int = 32) -> Tensor: ...


@dataclass(frozen=True)
class CandidatePair:
    """One candidate document of one query."""

    query_id: str
    doc_id: str


def candidate_run(source: str, data: RetrievalDataset, top_k: int, query_ids: list[str]) -> Run:
    """Candidates for ``query_ids``: BM25 top-``top_k`` computed now (``source == "bm25"``) or a TREC run file."""
    if source == BM25:
        from research.retrieval.bm25 import bm25_search

        return bm25_search(data, k=top_k, query_ids=query_ids, show_progress=False)
    if not Path(source).is_file():
        raise ResearchError(f"candidates '{source}': neither 'bm25' nor a run file")
    return read_run(source)


def candidate_pairs(data: RetrievalDataset, candidates: Mapping[str, Mapping[str, float]], top_k: int,
                    query_ids: Iterable[str] | None = None) -> list[CandidatePair]:
    """The top-``top_k`` candidates (trec_eval order) of each query, every id checked against the dataset.

    ``query_ids`` defaults to the candidate run's queries; a query without candidates contributes no pairs.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    query_ids = list(candidates if query_ids is None else query_ids)
    pairs = []
    for query_id in query_ids:
        if query_id not in data.queries:
            raise ResearchError(f"candidate query '{query_id}' is not in {data.path / 'queries.jsonl'}")
        for doc_id, _ in ranking(candidates.get(query_id, {}), top_k):
            if doc_id not in data.corpus:
                raise ResearchError(f"candidate document '{doc_id}' (query '{query_id}') is not in {data.path / 'corpus.jsonl'}")
            pairs.append(CandidatePair(query_id, doc_id))
    return pairs


def pairs_to_run(pairs: list[CandidatePair], scores: Iterable[float]) -> Run:
    """A run from pairs and their scores (same order)."""
    run: Run = {}
    for pair, score in zip(pairs, scores, strict=True):
        run.setdefault(pair.query_id, {})[pair.doc_id] = float(score)
    return run


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


class BiEncoderScorer:
    """A :class:`research.models.bi_encoder.BiEncoder` as a pair scorer: each distinct text is embedded once."""

    def __init__(self, encoder) -> None:
        self.encoder = encoder

    def score_pairs(self, queries: list[str], documents: list[str], batch_size: int = 32) -> Tensor:
        if len(queries) != len(documents):
            raise ValueError(f"{len(queries)} queries but {len(documents)} documents")
        unique_queries, unique_docs = list(dict.fromkeys(queries)), list(dict.fromkeys(documents))
        query_emb = self.encoder.encode_texts(unique_queries, is_query=True, batch_size=batch_size)
        doc_emb = self.encoder.encode_texts(unique_docs, is_query=False, batch_size=batch_size)
        q_index = {t: i for i, t in enumerate(unique_queries)}
        d_index = {t: i for i, t in enumerate(unique_docs)}
        q = query_emb[[q_index[t] for t in queries]]
        d = doc_emb[[d_index[t] for t in documents]]
        return (q * d).sum(-1).float()


# ---------------------------------------------------------------- loading a scorer from a model directory
@dataclass
class ScorerOptions:
    """What ``research rerank`` lets a user override when loading any scorer."""

    max_length: int | None = None
    trust_remote_code: bool = False
    device: str = "cpu"


class ScorerLoader(Protocol):
    """Recognises one kind of model directory (first by its marker file) and loads it as a :class:`PairScorer`."""

    marker: str

    def recognizes(self, path: Path) -> bool: ...

    def load(self, path: Path, options: ScorerOptions) -> PairScorer: ...


class CrossEncoderLoader:
    """Our cross-encoder directories, and any Hugging Face ``*ForSequenceClassification`` directory."""

    marker = "research_cross_encoder.json"

    def recognizes(self, path: Path) -> bool:
        if (path / self.marker).is_file():
            return True
        config = path / "config.json"
        if not config.is_file():
            return False
        architectures = json.loads(config.read_text()).get("architectures") or []
        return any(str(a).endswith("ForSequenceClassification") for a in architectures)

    def load(self, path: Path, options: ScorerOptions) -> PairScorer:
        from research.models.cross_encoder import CrossEncoder

        model = CrossEncoder.from_pretrained(path, trust_remote_code=options.trust_remote_code, max_length=options.max_length)
        return model.to(options.device).eval()


class BiEncoderLoader:
    """Our bi-encoder directories, and sentence-transformers embedding models (``modules.json`` with pooling)."""

    marker = "research_bi_encoder.json"

    def recognizes(self, path: Path) -> bool:
        if (path / self.marker).is_file():
            return True
        modules = path / "modules.json"
        return modules.is_file() and any(str(m.get("type", "")).endswith("Pooling") for m in json.loads(modules.read_text()))

    def load(self, path: Path, options: ScorerOptions) -> PairScorer:
        from research.models.bi_encoder import BiEncoder

        encoder = BiEncoder.from_pretrained(path, trust_remote_code=options.trust_remote_code,
                                            query_max_length=options.max_length, document_max_length=options.max_length)
        return BiEncoderScorer(encoder.to(options.device).eval())


class LLMRerankerLoader:
    """Our layer-wise LLM reranker directories (full weights, or a LoRA adapter over the recorded base model)."""

    marker = "research_llm_reranker.json"

    def recognizes(self, path: Path) -> bool:
        return (path / self.marker).is_file()

    def load(self, path: Path, options: ScorerOptions) -> PairScorer:
        from research.models.llm_reranker import LayerwiseLLMReranker

        model = LayerwiseLLMReranker.from_pretrained(path, trust_remote_code=options.trust_remote_code, max_length=options.max_length)
        return model.to(options.device).eval()


# Tried in order; the first loader that recognizes a directory loads it. A new scorer kind (e.g. the LLM reranker,
# marker file of its own) adds its loader here.
SCORER_LOADERS: tuple[ScorerLoader, ...] = (LLMRerankerLoader(), CrossEncoderLoader(), BiEncoderLoader())


def load_scorer(name_or_path: str | Path, options: ScorerOptions | None = None,
                loaders: tuple[ScorerLoader, ...] = SCORER_LOADERS) -> PairScorer:
    """The scorer a model directory (or packaged / hub name) holds, found by the first loader that recognizes it."""
    options = options or ScorerOptions()
    path = resolve_model(name_or_path)
    for loader in loaders:
        if loader.recognizes(path):
            return loader.load(path, options)
    markers = ", ".join(loader.marker for loader in loaders)
    raise ResearchError(f"{path}: not a model directory any scorer loader recognizes (marker files: {markers})")
