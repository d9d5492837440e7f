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


def test_a_saved_index_is_memory_mapped_by_the_next_run_with_the_same_settings(data, tmp_path, monkeypatch):
    """``index_dir``: the first run tokenises the corpus and saves the index; a second run with the same corpus and
    settings loads it memory-mapped (no corpus tokenisation) and gives the same run; other settings rebuild it."""
    import bm25s

    folder = tmp_path / "bm25-index"
    first = bm25_search(data, k=5, index_dir=folder)
    assert (folder / "research_bm25.json").is_file()
    calls = []
    real_tokenize = bm25s.tokenize
    monkeypatch.setattr(bm25s, "tokenize", lambda texts, *a, **k: calls.append(len(texts)) or real_tokenize(texts, *a, **k))
    loaded = BM25Index(data, index_dir=folder)
    assert isinstance(loaded.retriever.scores["data"], np.memmap)
    assert bm25_search(data, k=5, index_dir=folder) == first
    assert len(data.corpus) not in calls  # only queries were tokenised
    other = bm25_search(data, k=5, config=BM25Config(k1=0.9), index_dir=folder)  # another key: indexed again
    assert len(data.corpus) in calls and other != first
    assert BM25Index(data, BM25Config(k1=0.9), index_dir=folder).retriever.k1 == 0.9
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    with pytest.raises(Exception, match="not a BM25 index folder"):
        BM25Index(data, index_dir=tmp_path / "notes")


def test_research_bm25_index_dir_reuses_the_saved_index(tiny_beir_dir, tmp_path, capsys):
    from research.cli.main import main

    common = ["bm25", "--data", str(tiny_beir_dir), "--index-dir", str(tmp_path / "index")]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert "indexing corpus: 36 documents" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "b")]) == 0
    assert "loading BM25 index: 36 documents" in capsys.readouterr().err
    assert (tmp_path / "a" / "run.trec").read_text() == (tmp_path / "b" / "run.trec").read_text()
