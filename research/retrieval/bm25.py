"""BM25 with bm25s (MTEB's bm25s baseline: Lucene BM25, English stopwords and Snowball stemmer): one corpus index,
searched top-k for a run (:func:`bm25_search`) or scored against every document (the zELO BM25 judge).

With ``index_dir`` the index is saved there (bm25s' own format, written to a temporary folder and renamed) with a
key of the corpus and the settings, and a later run with the same key memory-maps it instead of tokenising the
corpus again: on millions of passages the saved index is read through the page cache, not rebuilt per run."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from research import progress
from research.data.beir import RetrievalDataset
from research.data.trec import Run
from research.errors import ResearchError

KEY_FILE = "research_bm25.json"  # written last: a folder without it is no index


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

    def __init__(self, data: RetrievalDataset, config: BM25Config | None = None, show_progress: bool = False,
                 index_dir: str | Path | None = None) -> None:
        import bm25s

        self.config = config or BM25Config()
        self.stemmer = None
        if self.config.stemmer_language:
            import Stemmer

            self.stemmer = Stemmer.Stemmer(self.config.stemmer_language)
        self.doc_ids = list(data.corpus)
        key = self._key(data) if index_dir is not None else None
        if key is not None and self._saved_key(Path(index_dir)) == key:
            with progress.stage("loading BM25 index", total=len(self.doc_ids), unit="documents") as step:
                self.retriever = bm25s.BM25.load(str(index_dir), mmap=True, show_progress=False)
                step.advance(len(self.doc_ids))
            return
        with progress.stage("indexing corpus", total=len(self.doc_ids), unit="documents") as step:
            # values() in corpus order: an offset-indexed corpus is streamed, not looked up id by id
            tokens = bm25s.tokenize([doc.full_text for doc in data.corpus.values()], stopwords=self.config.stopwords,
                                    stemmer=self.stemmer, show_progress=show_progress)
            self.retriever = bm25s.BM25(k1=self.config.k1, b=self.config.b, method=self.config.method)
            self.retriever.index(tokens, show_progress=show_progress)
            step.advance(len(self.doc_ids))
        if key is not None:
            self._save(Path(index_dir), key)

    def _key(self, data: RetrievalDataset) -> dict:
        import bm25s

        from research.retrieval.index.encode import corpus_digest

        return {"corpus": corpus_digest(data.corpus), "documents": len(self.doc_ids), "config": asdict(self.config),
                "bm25s": bm25s.__version__}

    @staticmethod
    def _saved_key(folder: Path) -> dict | None:
        """The key of the index saved in ``folder`` (None: no complete index there)."""
        path = folder / KEY_FILE
        if not path.is_file():
            if folder.exists() and any(folder.iterdir()):
                raise ResearchError(f"{folder}: not a BM25 index folder (no {KEY_FILE}); pass an empty or new folder")
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ResearchError(f"{path}: invalid JSON ({error.msg}, line {error.lineno})") from None

    def _save(self, folder: Path, key: dict) -> None:
        """Save the index into ``folder`` (replacing an index of another key) through a temporary sibling folder."""
        tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        self.retriever.save(str(tmp), show_progress=False)
        (tmp / KEY_FILE).write_text(json.dumps(key, sort_keys=True), encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)

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
                query_ids: list[str] | None = None, show_progress: bool = False,
                index_dir: str | Path | None = None, index: BM25Index | None = None) -> Run:
    """Index the corpus (title + text; or load the index saved in ``index_dir``; or search ``index``, an index of
    this very corpus) and return the top-``k`` run for the judged queries (or ``query_ids``).

    Indexing and searching report as :mod:`research.progress` stages; ``show_progress`` adds bm25s' own bars."""
    if index is None:
        index = BM25Index(data, config, show_progress=show_progress, index_dir=index_dir)
    elif index.doc_ids != list(data.corpus):
        raise ValueError(f"the BM25 index holds {len(index.doc_ids):,} documents that are not this corpus's "
                         f"{len(data.corpus):,}")
    query_ids = list(query_ids if query_ids is not None else data.judged_queries)
    results, scores = index.search([data.queries[q] for q in query_ids], k, show_progress=show_progress)
    return {
        qid: {index.doc_ids[int(i)]: float(s) for i, s in zip(row_idx, row_scores)}
        for qid, row_idx, row_scores in zip(query_ids, results, scores)
    }
