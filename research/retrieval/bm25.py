"""BM25 with bm25s (MTEB's bm25s baseline: Lucene BM25, English stopwords and Snowball stemmer): one corpus index,
searched top-k for a run (:func:`bm25_search`) or scored against every document (the zELO BM25 judge)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from research import progress
from research.data.beir import RetrievalDataset
from research.data.trec import Run


@dataclass
class BM25Config:
    k1: float = 1.5
    b: float = 0.75
    method: str = "lucene"
    stopwords: str | None = "en"
    stemmer_language: str | None = "english"


class BM25Index:
    """A corpus's documents (title + text, in corpus order) indexed once with a :class:`BM25Config`.

    Queries go through the same tokeniser, stopwords and stemmer as the documents, so a query's
    :meth:`scores` and :meth:`search` agree with each other and with ``research bm25``.
    """

    def __init__(self, data: RetrievalDataset, config: BM25Config | None = None, show_progress: bool = False) -> None:
        import bm25s

        self.config = config or BM25Config()
        self.stemmer = None
        if self.config.stemmer_language:
            import Stemmer

            self.stemmer = Stemmer.Stemmer(self.config.stemmer_language)
        self.doc_ids = list(data.corpus)
        with progress.stage("indexing corpus", total=len(self.doc_ids), unit="documents") as step:
            tokens = bm25s.tokenize([data.corpus[d].full_text for d in self.doc_ids], stopwords=self.config.stopwords,
                                    stemmer=self.stemmer, show_progress=show_progress)
            self.retriever = bm25s.BM25(k1=self.config.k1, b=self.config.b, method=self.config.method)
            self.retriever.index(tokens, show_progress=show_progress)
            step.advance(len(self.doc_ids))

    def search(self, queries: list[str], k: int, show_progress: bool = False,
               chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """The top-``k`` document positions (into :attr:`doc_ids`) and their scores, one row per query, searched
        ``chunk`` queries at a time (a ``searching`` progress stage)."""
        import bm25s

        if not queries:
            return np.zeros((0, min(k, len(self.doc_ids))), dtype=np.int64), np.zeros((0, min(k, len(self.doc_ids))))
        results, scores = [], []
        with progress.stage("searching", total=len(queries), unit="queries") as step:
            for start in range(0, len(queries), chunk):
                part = queries[start:start + chunk]
                tokens = bm25s.tokenize(part, stopwords=self.config.stopwords, stemmer=self.stemmer, show_progress=False)
                found, found_scores = self.retriever.retrieve(tokens, k=min(k, len(self.doc_ids)),
                                                              show_progress=show_progress)
                results.append(found)
                scores.append(found_scores)
                step.advance(len(part))
        return np.concatenate(results), np.concatenate(scores)

    def scores(self, query: str) -> np.ndarray:
        """The query's BM25 score of every document, in :attr:`doc_ids` order."""
        import bm25s

        tokens = bm25s.tokenize([query], stopwords=self.config.stopwords, stemmer=self.stemmer, return_ids=False,
                                show_progress=False)[0]
        return np.asarray(self.retriever.get_scores(tokens), dtype=float)


def bm25_search(data: RetrievalDataset, k: int = 100, config: BM25Config | None = None,
                query_ids: list[str] | None = None, show_progress: bool = False) -> Run:
    """Index the corpus (title + text) and return the top-``k`` run for the judged queries (or ``query_ids``).

    Indexing and searching report as :mod:`research.progress` stages; ``show_progress`` adds bm25s' own bars."""
    index = BM25Index(data, config, show_progress=show_progress)
    query_ids = list(query_ids if query_ids is not None else data.judged_queries)
    results, scores = index.search([data.queries[q] for q in query_ids], k, show_progress=show_progress)
    return {
        qid: {index.doc_ids[int(i)]: float(s) for i, s in zip(row_idx, row_scores)}
        for qid, row_idx, row_scores in zip(query_ids, results, scores)
    }
