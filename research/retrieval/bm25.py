"""BM25 first-stage retrieval with bm25s (MTEB's bm25s baseline: Lucene BM25, English stopwords and Snowball stemmer)."""

from __future__ import annotations

from dataclasses import dataclass

from research.data.beir import RetrievalDataset
from research.data.trec import Run


@dataclass
class BM25Config:
    k1: float = 1.5
    b: float = 0.75
    method: str = "lucene"
    stopwords: str | None = "en"
    stemmer_language: str | None = "english"


def bm25_search(data: RetrievalDataset, k: int = 100, config: BM25Config | None = None,
                query_ids: list[str] | None = None, show_progress: bool = True) -> Run:
    """Index the corpus (title + text) and return the top-``k`` run for the judged queries (or ``query_ids``)."""
    import bm25s

    config = config or BM25Config()
    stemmer = None
    if config.stemmer_language:
        import Stemmer

        stemmer = Stemmer.Stemmer(config.stemmer_language)
    doc_ids = list(data.corpus)
    corpus_tokens = bm25s.tokenize([data.corpus[d].full_text for d in doc_ids], stopwords=config.stopwords,
                                   stemmer=stemmer, show_progress=show_progress)
    retriever = bm25s.BM25(k1=config.k1, b=config.b, method=config.method)
    retriever.index(corpus_tokens, show_progress=show_progress)
    query_ids = list(query_ids if query_ids is not None else data.judged_queries)
    query_tokens = bm25s.tokenize([data.queries[q] for q in query_ids], stopwords=config.stopwords, stemmer=stemmer,
                                  show_progress=False)
    results, scores = retriever.retrieve(query_tokens, k=min(k, len(doc_ids)), show_progress=show_progress)
    return {
        qid: {doc_ids[int(i)]: float(s) for i, s in zip(row_idx, row_scores)}
        for qid, row_idx, row_scores in zip(query_ids, results, scores)
    }
