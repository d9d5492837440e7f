"""MS MARCO loaders: tiny files (every validation error names file, line and field), the dataset they build (BM25 and
the metrics run on it), BEIR conversion, and the real dev.small queries + qrels at full size."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from research.data.beir import load_dataset
from research.data.msmarco import (
    IdTriple,
    TextTriple,
    build_dataset,
    id_triples_to_groups,
    load_msmarco,
    read_collection,
    read_qrels,
    read_queries,
    read_triples_ids,
    read_triples_text,
    triples_to_beir,
    write_beir,
)
from research.errors import DataFormatError

MSMARCO = Path(os.environ.get("RESEARCH_DATA_DIR", "/work/shared/data")) / "msmarco-passage"


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


@pytest.fixture()
def tiny(tmp_path):
    collection = write(tmp_path / "collection.tsv",
                       "0\tthe rocket reached orbit around the planet\n"
                       "1\tbake the bread with cheese and sugar\n"
                       "2\tthe whale swam past the coral reef\n"
                       "3\ta piano concert with violin and drum\n")
    queries = write(tmp_path / "queries.tsv", "10\twhat rocket reached orbit\n11\t how to bake bread\n12\twhale reef\n")
    qrels = write(tmp_path / "qrels.tsv", "10 0 0 1\n11\t0\t1\t1\n12 0 2 2\n12 0 3 0\n")
    return collection, queries, qrels


def test_tiny_files_load_into_a_dataset_that_bm25_and_metrics_use(tiny, tmp_path):
    collection, queries, qrels = tiny
    assert read_collection(collection)["1"] == "bake the bread with cheese and sugar"
    assert read_queries(queries)["11"] == "how to bake bread"  # surrounding blanks stripped
    assert read_qrels(qrels) == {"10": {"0": 1}, "11": {"1": 1}, "12": {"2": 2, "3": 0}}
    dataset = load_msmarco(collection, queries, qrels, split="dev")
    assert dataset.split == "dev" and dataset.corpus["2"].full_text == "the whale swam past the coral reef"
    assert list(dataset.judged_queries) == ["10", "11", "12"]

    from research.eval.evaluation import evaluate_run
    from research.retrieval.bm25 import bm25_search

    run = bm25_search(dataset, k=4)
    result = evaluate_run(run, dataset.qrels, metrics=("nDCG@10", "RR@10"))
    assert result.metrics.aggregate["RR@10"] == 1.0  # each query's words point at its passage

    folder = write_beir(dataset, tmp_path / "beir")  # the framework's BEIR loader reads it back unchanged
    again = load_dataset(folder, "dev")
    assert again.qrels == dataset.qrels and again.queries == dataset.queries
    assert {k: v.text for k, v in again.corpus.items()} == {k: v.text for k, v in dataset.corpus.items()}


@pytest.mark.parametrize("name, text, line, field, message", [
    ("collection", "0\tfine\n1\n", 2, None, "expected 2 tab-separated columns"),
    ("collection", "0\tfine\n1\ta\tb\n", 2, None, "got 3"),
    ("collection", "0\tfine\n1\t   \n", 2, "text", "empty"),
    ("collection", "0\tfine\n0\tagain\n", 2, "pid", "duplicate id '0'"),
    ("collection", "0\tfine\nx7\ttext\n", 2, "pid", "non-negative integer"),
    ("collection", "-3\ttext\n", 1, "pid", "non-negative integer"),
    ("queries", "5\tq\n\n6\t\n", 3, "text", "empty"),
    ("queries", "5\tq\n5\tq again\n", 2, "qid", "duplicate"),
    ("triples_text", "q\tpos\tneg\nq\tpos\n", 2, None, "expected 3 tab-separated columns"),
    ("triples_text", "q\tpos\t\n", 1, "negative", "empty"),
    ("triples_ids", "1\t2\t3\n1\t2\tx\n", 2, "neg_pid", "non-negative integer"),
    ("triples_ids", "1\t2\t3\n1\t2\t3\n", 2, None, "duplicate triple"),
    ("triples_ids", "1\t2\t2\n", 1, "neg_pid", "equals the positive"),
])
def test_malformed_records_name_file_line_and_field(tmp_path, name, text, line, field, message):
    path = write(tmp_path / f"{name}.tsv", text)
    reader = {"collection": read_collection, "queries": read_queries, "triples_text": read_triples_text,
              "triples_ids": read_triples_ids}[name]
    with pytest.raises(DataFormatError, match=message) as err:
        reader(path)
    assert (err.value.path, err.value.line, err.value.field) == (str(path), line, field)


def test_qrels_ids_and_references_are_checked(tiny, tmp_path):
    collection, queries, _ = tiny
    bad = write(tmp_path / "bad.tsv", "10 0 0 1\n10 0 p1 1\n")
    with pytest.raises(DataFormatError, match="integer") as err:
        read_qrels(bad)
    assert (err.value.line, err.value.field) == (2, "doc_id")
    assert read_qrels(bad, int_ids=False)["10"] == {"0": 1, "p1": 1}
    unknown = write(tmp_path / "unknown.tsv", "10 0 0 1\n11 0 9 1\n")
    with pytest.raises(DataFormatError, match="unknown passage '9'") as err:
        load_msmarco(collection, queries, unknown)
    assert err.value.line == 2
    with pytest.raises(DataFormatError, match="unknown query '99'"):
        build_dataset({"0": "x"}, {"10": "q"}, {"99": {"0": 1}})
    with pytest.raises(DataFormatError, match="duplicate document"):  # research.data.trec's own check
        read_qrels(write(tmp_path / "dup.tsv", "10 0 0 1\n10 0 0 1\n"))
    ids = read_triples_ids(write(tmp_path / "ids.tsv", "10\t0\t1\n"), queries=read_queries(queries),
                           collection=read_collection(collection))
    assert ids == [IdTriple("10", "0", "1")]
    with pytest.raises(DataFormatError, match="unknown passage '7'"):
        read_triples_ids(write(tmp_path / "ids2.tsv", "10\t0\t7\n"), collection=read_collection(collection))
    assert read_collection(write(tmp_path / "s.tsv", "doc-a\ttext\n"), int_ids=False) == {"doc-a": "text"}


def test_triples_become_training_data(tmp_path):
    path = write(tmp_path / "triples.tsv", "what is a rocket\trocket reached orbit\tbake bread\n"
                                           "what is a rocket\trocket reached orbit\tpiano concert\n"
                                           "whale reef\tthe whale swam\tcheese soup\n")
    triples = read_triples_text(tmp_path / "triples.tsv")
    assert triples[0] == TextTriple("what is a rocket", "rocket reached orbit", "bake bread")
    assert read_triples_text(path, limit=1) == triples[:1]
    folder = triples_to_beir(triples, tmp_path / "beir")
    data = load_dataset(folder, "train")
    assert len(data.queries) == 2 and len(data.corpus) == 5 and sum(map(len, data.qrels.values())) == 2
    groups = [json.loads(line) for line in (folder / "groups.jsonl").read_text().splitlines()]
    rocket = next(g for g in groups if data.queries[g["query_id"]] == "what is a rocket")
    assert [data.corpus[n].text for n in rocket["negatives"]] == ["bake bread", "piano concert"]

    from research.data.groups import read_groups

    assert set(read_groups(folder / "groups.jsonl", data.queries, data.corpus)) == set(data.queries)
    count = id_triples_to_groups([IdTriple("1", "2", "3"), IdTriple("1", "2", "4"), IdTriple("5", "6", "3")],
                                 tmp_path / "groups.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "groups.jsonl").read_text().splitlines()]
    assert count == 2 and lines[0] == {"query_id": "1", "positives": ["2"], "negatives": ["3", "4"]}


@pytest.mark.skipif(not (MSMARCO / "topics.msmarco-passage.dev-subset.txt").is_file(), reason="no shared MS MARCO data")
def test_real_dev_small_queries_and_qrels_at_full_size(tmp_path):
    queries = read_queries(MSMARCO / "topics.msmarco-passage.dev-subset.txt")
    qrels = read_qrels(MSMARCO / "qrels.msmarco-passage.dev-subset.txt")
    assert len(queries) == 6980
    assert len(qrels) == 6980 and sum(map(len, qrels.values())) == 7437
    assert set(qrels) <= set(queries)
    assert queries["2"] == "Androgen receptor define"
    assert all(grade == 1 for docs in qrels.values() for grade in docs.values())
    # no passage texts are shared: a stand-in collection of the judged pids builds the full-size dataset
    collection = {pid: f"passage {pid}" for docs in qrels.values() for pid in docs}
    dataset = build_dataset(collection, queries, qrels, split="dev")
    assert len(dataset.judged_queries) == 6980 and len(dataset.corpus) == len(collection)
    dl19 = read_qrels(MSMARCO / "qrels.dl19-passage.txt")
    assert len(dl19) == 43 and sum(map(len, dl19.values())) == 9260
    assert len(read_queries(MSMARCO / "topics.dl19-passage.txt")) == 43
