"""Real all-MiniLM-L6-v2 on a slice of SciFact: our embeddings equal sentence-transformers', our metrics pytrec_eval's.

The slice (20 test queries; the corpus restricted to their relevant documents plus 300 others) is built in a
temporary data root from the SciFact folder under ``$RESEARCH_DATA_DIR``; the test is skipped without it.
Documents are cut at 128 tokens and sentence-transformers re-encodes 64 of them, to stay well under a minute of CPU.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

NUM_QUERIES, NUM_OTHER_DOCS = 20, 300
MAX_LENGTH = 128  # documents cut at 128 tokens (the model's own 256 doubles the CPU time); both sides alike
NUM_COMPARED_DOCS = 64  # sentence-transformers re-encodes the relevant documents and some others
MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def _source() -> Path:
    root = os.environ.get("RESEARCH_DATA_DIR")
    if not root or not (Path(root) / "scifact" / "corpus.jsonl").is_file():
        pytest.skip("SciFact is not under $RESEARCH_DATA_DIR")
    return Path(root) / "scifact"


def _write_slice(source: Path, target: Path) -> None:
    from research.io import iter_jsonl

    rows = (source / "qrels" / "test.tsv").read_text(encoding="utf-8").splitlines()
    header, body = rows[0], [r.split("\t") for r in rows[1:] if r.strip()]
    query_ids = list(dict.fromkeys(q for q, _, _ in body))[:NUM_QUERIES]
    kept_rows = [r for r in body if r[0] in query_ids]
    relevant = {d for _, d, _ in kept_rows}
    corpus, others = [], 0
    for _, record in iter_jsonl(source / "corpus.jsonl"):
        if record["_id"] in relevant or others < NUM_OTHER_DOCS:
            others += record["_id"] not in relevant
            corpus.append(record)
    queries = [r for _, r in iter_jsonl(source / "queries.jsonl") if r["_id"] in set(query_ids)]
    (target / "qrels").mkdir(parents=True)
    (target / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus), encoding="utf-8")
    (target / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries), encoding="utf-8")
    (target / "qrels" / "test.tsv").write_bytes(("\r\n".join([header] + ["\t".join(r) for r in kept_rows]) + "\r\n").encode())


def test_minilm_on_a_scifact_slice(tmp_path, monkeypatch):
    source = _source()
    pytrec_eval = pytest.importorskip("pytrec_eval")
    import torch
    from sentence_transformers import SentenceTransformer

    from research.data.beir import load_dataset
    from research.data.trec import truncate_run
    from research.eval.metrics import compute_metrics
    from research.models.bi_encoder import BiEncoder
    from research.models.pretrained import resolve_model
    from research.retrieval.dense import dense_search

    _write_slice(source, tmp_path / "root" / "scifact")
    monkeypatch.setenv("RESEARCH_DATA_DIR", str(tmp_path / "root"))
    data = load_dataset("scifact", "test")  # a name, resolved under the data root
    assert data.path == tmp_path / "root" / "scifact"
    relevant = {d for docs in data.qrels.values() for d in docs}
    assert len(data.qrels) == NUM_QUERIES and len(data.corpus) == NUM_OTHER_DOCS + len(relevant)

    query_ids, doc_ids = list(data.judged_queries), list(data.corpus)
    query_texts = [data.queries[q] for q in query_ids]
    doc_texts = [data.corpus[d].full_text for d in doc_ids]
    encoder = BiEncoder.from_pretrained(MODEL, document_max_length=MAX_LENGTH).eval()
    assert (encoder.config.pooling, encoder.config.normalize) == ("mean", True)  # read from the ST directory
    ours_q = encoder.encode_texts(query_texts, is_query=True, batch_size=32)
    ours_d = encoder.encode_texts(doc_texts, is_query=False, batch_size=32)

    st = SentenceTransformer(str(resolve_model(MODEL)), device="cpu")
    st.max_seq_length = MAX_LENGTH
    compared = sorted({doc_ids.index(d) for d in relevant} | set(range(0, len(doc_ids), 7)))[:NUM_COMPARED_DOCS]
    st_q = st.encode(query_texts, batch_size=32, convert_to_tensor=True)
    st_d = st.encode([doc_texts[i] for i in compared], batch_size=32, convert_to_tensor=True)
    assert max(len(encoder.tokenize([doc_texts[i]], False)["input_ids"][0]) for i in compared) == MAX_LENGTH
    torch.testing.assert_close(ours_q, st_q.cpu(), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_d[compared], st_d.cpu(), atol=1e-5, rtol=0)

    run = dense_search(ours_q, ours_d, query_ids, doc_ids, k=100)
    ours = compute_metrics(run, data.qrels, metrics=("nDCG@10", "RR@10", "R@100", "AP@100"))
    evaluator = pytrec_eval.RelevanceEvaluator(data.qrels, {"ndcg_cut.10", "recall.100", "map_cut.100"})
    reference = evaluator.evaluate(run)
    top10 = pytrec_eval.RelevanceEvaluator(data.qrels, {"recip_rank"}).evaluate(truncate_run(run, 10))
    assert set(reference) == set(ours.per_query) == set(query_ids)
    for qid in query_ids:
        assert ours.per_query[qid]["nDCG@10"] == pytest.approx(reference[qid]["ndcg_cut_10"], abs=1e-6)
        assert ours.per_query[qid]["R@100"] == pytest.approx(reference[qid]["recall_100"], abs=1e-6)
        assert ours.per_query[qid]["AP@100"] == pytest.approx(reference[qid]["map_cut_100"], abs=1e-6)
        assert ours.per_query[qid]["RR@10"] == pytest.approx(top10[qid]["recip_rank"], abs=1e-6)
    mean_ndcg = sum(r["ndcg_cut_10"] for r in reference.values()) / len(reference)
    assert ours.aggregate["nDCG@10"] == pytest.approx(mean_ndcg, abs=1e-9)
    assert ours.aggregate["nDCG@10"] > 0.5  # MiniLM finds SciFact's evidence in a small corpus
