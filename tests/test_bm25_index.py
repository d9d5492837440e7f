"""One BM25 index for search and scoring: ``research bm25``'s run and the zELO BM25 judge read the same numbers."""

from __future__ import annotations

import numpy as np
import pytest

from research.retrieval.bm25 import BM25Config, BM25Index, bm25_search


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from helpers import make_tiny_beir

    from research.data.beir import load_dataset

    return load_dataset(make_tiny_beir(tmp_path_factory.mktemp("bm25_beir") / "tiny"), "train")


@pytest.mark.parametrize("config", [BM25Config(), BM25Config(k1=0.9, b=0.4, stopwords=None, stemmer_language=None)])
def test_scores_of_every_document_agree_with_the_top_k_search(data, config):
    index = BM25Index(data, config)
    assert index.doc_ids == list(data.corpus)
    query_ids = list(data.judged_queries)[:3]
    run = bm25_search(data, k=5, config=config, query_ids=query_ids, show_progress=False)
    positions, top_scores = index.search([data.queries[q] for q in query_ids], 5)
    for query_id, row, row_scores in zip(query_ids, positions, top_scores):
        scores = index.scores(data.queries[query_id])
        assert scores.shape == (len(data.corpus),)
        assert {index.doc_ids[int(i)]: float(s) for i, s in zip(row, row_scores)} == run[query_id]
        assert [scores[index.doc_ids.index(d)] for d in run[query_id]] == pytest.approx(list(run[query_id].values()),
                                                                                       rel=1e-5)
        assert np.sort(scores)[::-1][:5] == pytest.approx(sorted(run[query_id].values(), reverse=True), rel=1e-5)
