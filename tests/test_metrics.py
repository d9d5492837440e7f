"""Metrics against pytrec_eval (trec_eval), a hand-worked example, and TREC file IO."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import pytrec_eval

from research.data.trec import (
    ranking,
    read_run,
    read_trec_qrels,
    read_tsv_qrels,
    truncate_run,
    write_run,
)
from research.errors import DataFormatError
from research.eval.metrics import compute_metrics, parse_metric

PYTREC = {"nDCG@10": "ndcg_cut_10", "nDCG@5": "ndcg_cut_5", "R@100": "recall_100", "R@20": "recall_20",
          "AP@100": "map_cut_100", "AP@10": "map_cut_10", "P@5": "P_5", "P@30": "P_30"}
RR_CUTS = (1, 10, 100)


def make_data(seed: int = 7):
    rng = random.Random(seed)
    qrels, run = {}, {}
    for q in range(80):
        qid = f"q{q}"
        pool = [f"d{rng.randrange(300)}" for _ in range(rng.randrange(1, 160))]
        kind = q % 8
        if kind != 0:  # kind 0: judged, but no document relevant
            grades = [-2, -1, 0, 0, 0, 1, 1, 2, 3]
            judged = rng.sample(pool, min(len(pool), rng.randrange(1, 25))) + [f"u{q}_{i}" for i in range(rng.randrange(3))]
            qrels[qid] = {doc: rng.choice(grades) for doc in judged}
        else:
            qrels[qid] = {doc: rng.choice([-1, 0]) for doc in pool[:5]}
        if kind == 1:
            continue  # judged query missing from the run
        # coarse scores give many ties; a shifted range gives scores <= 0 (negative cosine)
        run[qid] = {doc: round(rng.uniform(-1.0, 0.5), 1) for doc in pool}
    run["extra"] = {"d1": 1.0, "d2": 0.5}  # run query absent from qrels
    return run, qrels


def pytrec(run, qrels, measures, relevance_level=1):
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, set(measures), relevance_level=relevance_level)
    return evaluator.evaluate({qid: docs for qid, docs in run.items() if docs})


@pytest.mark.parametrize("level", [1, 2])
def test_matches_pytrec_eval(level):
    run, qrels = make_data()
    names = list(PYTREC) + [f"RR@{k}" for k in RR_CUTS]
    result = compute_metrics(run, qrels, names, relevance_level=level)
    reference = pytrec(run, qrels, PYTREC.values(), level)
    rr = {k: pytrec(truncate_run(run, k), qrels, ["recip_rank"], level) for k in RR_CUTS}

    evaluated = sorted(q for q, docs in qrels.items() if any(g >= level for g in docs.values()))
    skipped = sorted(set(qrels) - set(evaluated))
    missing = [q for q in evaluated if q not in run]
    assert skipped and missing and "extra" not in result.per_query
    assert sorted(result.per_query) == evaluated and sorted(result.skipped_queries) == skipped
    assert result.num_queries == len(evaluated)
    for qid in evaluated:
        got = result.per_query[qid]
        if qid in missing:
            assert all(value == 0.0 for value in got.values()), qid
            continue
        for name, measure in PYTREC.items():
            assert got[name] == pytest.approx(reference[qid][measure], abs=1e-9), (qid, name)
        for k in RR_CUTS:
            assert got[f"RR@{k}"] == pytest.approx(rr[k][qid]["recip_rank"], abs=1e-9), (qid, k)
    for name in names:
        expected = sum(result.per_query[q][name] for q in evaluated) / len(evaluated)
        assert result.aggregate[name] == pytest.approx(expected, abs=1e-12)
    mean_ndcg = sum(reference[q]["ndcg_cut_10"] for q in evaluated if q not in missing) / len(evaluated)
    assert result.aggregate["nDCG@10"] == pytest.approx(mean_ndcg, abs=1e-9)
    assert 0 < result.aggregate["nDCG@10"] < 1



@pytest.mark.parametrize("level", [1, 2])
def test_trec_eval_convention_counts_queries_without_relevant(level):
    """queries_without_relevant="trec_eval": the mean over every qrels query equals pytrec_eval's (run-less queries 0, as
    trec_eval -c); a query without a document at the level keeps its nDCG from lower grades and scores 0 elsewhere."""
    run, qrels = make_data()
    names = list(PYTREC) + ["RR@10"]
    result = compute_metrics(run, qrels, names, relevance_level=level, queries_without_relevant="trec_eval")
    reference = pytrec(run, qrels, PYTREC.values(), level)
    rr = pytrec(truncate_run(run, 10), qrels, ["recip_rank"], level)
    without = [q for q, docs in qrels.items() if not any(g >= level for g in docs.values()) and q in reference]
    assert without and result.skipped_queries == [] and result.num_queries == len(qrels) == len(result.per_query)
    if level == 2:  # graded: some query has grade-1 documents only, and trec_eval still gives it an nDCG
        assert any(reference[q]["ndcg_cut_10"] > 0 for q in without)
    for name in names:
        values = [(rr[q]["recip_rank"] if name == "RR@10" else reference[q][PYTREC[name]]) if q in reference else 0.0
                  for q in qrels]
        assert result.aggregate[name] == pytest.approx(math.fsum(values) / len(qrels), abs=1e-12), name
    for q in without:
        assert result.per_query[q]["nDCG@10"] == pytest.approx(reference[q]["ndcg_cut_10"], abs=1e-12)
        assert result.per_query[q]["R@100"] == result.per_query[q]["AP@100"] == result.per_query[q]["RR@10"] == 0.0
    default = compute_metrics(run, qrels, names, relevance_level=level)
    assert default.aggregate == compute_metrics(run, qrels, names, level, queries_without_relevant="exclude").aggregate
    assert default.num_queries == len(qrels) - len(default.skipped_queries) < len(qrels)
    with pytest.raises(ValueError, match="queries_without_relevant"):
        compute_metrics(run, qrels, names, level, queries_without_relevant="zero")

def test_nontrivial_data():
    """The random data really exercises ties, non-positive scores, negative grades and cutoffs."""
    run, qrels = make_data()
    scores = [s for docs in run.values() for s in docs.values()]
    assert sum(s <= 0 for s in scores) > len(scores) / 2
    assert any(len(set(docs.values())) < len(docs) for docs in run.values())
    assert any(len(docs) > 100 for docs in run.values())
    assert any(g < 0 for docs in qrels.values() for g in docs.values())


def test_hand_worked_example():
    qrels = {"q": {"a": 3, "b": 0, "c": 1, "d": 2, "e": -1, "z": 1}}
    # trec order: c (0.9), then the 0.5 ties by doc id descending: e, d, b; then a (-0.2); x unjudged
    run = {"q": {"a": -0.2, "b": 0.5, "c": 0.9, "d": 0.5, "e": 0.5, "x": -0.5}}
    assert [doc for doc, _ in ranking(run["q"])] == ["c", "e", "d", "b", "a", "x"]
    res = compute_metrics(run, qrels, ["nDCG@3", "nDCG@10", "RR@10", "RR@1", "R@3", "R@10", "AP@10", "P@5"])
    q = res.per_query["q"]
    ideal3 = 3 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)
    ideal10 = ideal3 + 1 / math.log2(5)
    assert q["nDCG@3"] == pytest.approx((1 / math.log2(2) + 2 / math.log2(4)) / ideal3, abs=1e-12)
    assert q["nDCG@10"] == pytest.approx((1 / math.log2(2) + 2 / math.log2(4) + 3 / math.log2(6)) / ideal10, abs=1e-12)
    assert q["RR@10"] == 1.0 and q["RR@1"] == 1.0
    assert q["R@3"] == pytest.approx(2 / 4) and q["R@10"] == pytest.approx(3 / 4)
    assert q["AP@10"] == pytest.approx((1 / 1 + 2 / 3 + 3 / 5) / 4, abs=1e-12)
    assert q["P@5"] == pytest.approx(3 / 5)
    lvl2 = compute_metrics(run, qrels, ["RR@10", "AP@10", "nDCG@3"], relevance_level=2).per_query["q"]
    assert lvl2["RR@10"] == pytest.approx(1 / 3)
    assert lvl2["AP@10"] == pytest.approx((1 / 3 + 2 / 5) / 2, abs=1e-12)
    assert lvl2["nDCG@3"] == pytest.approx(q["nDCG@3"], abs=1e-12)  # gain ignores the relevance level


def test_convention_and_names():
    qrels = {"hit": {"a": 1}, "miss": {"a": 1}, "empty": {"a": 1}, "none": {"a": 0, "b": -1}}
    run = {"hit": {"a": -3.0, "b": -4.0}, "empty": {}, "none": {"a": 1.0}, "other": {"a": 1.0}}
    res = compute_metrics(run, qrels, ["ndcg@10", "rr@10", "p@1"])
    assert res.num_queries == 3 and res.skipped_queries == ["none"]
    assert res.per_query["hit"] == {"nDCG@10": 1.0, "RR@10": 1.0, "P@1": 1.0}
    assert res.per_query["miss"] == res.per_query["empty"] == {"nDCG@10": 0.0, "RR@10": 0.0, "P@1": 0.0}
    assert res.aggregate == pytest.approx({"nDCG@10": 1 / 3, "RR@10": 1 / 3, "P@1": 1 / 3})
    assert parse_metric("AP@100") == ("AP", 100)
    for bad in ["MRR@10", "nDCG", "nDCG@0", "R@x", "recall@10"]:
        with pytest.raises(ValueError, match="unknown metric"):
            compute_metrics(run, qrels, [bad])
    with pytest.raises(ValueError, match="NaN"):
        compute_metrics({"hit": {"a": float("nan")}}, qrels)


def test_run_round_trip(tmp_path):
    run = {"q1": {"b": 0.5, "a": 0.5, "c": 1e-12, "d": -0.123456789012345, "e": 123456.78901234},
           "q2": {"x": np.float32(0.1), "y": 3}}
    path = tmp_path / "run.trec"
    write_run(path, run, tag="bm25")
    lines = path.read_text().splitlines()
    assert lines[0].split() == ["q1", "Q0", "e", "1", "123456.78901234", "bm25"]
    assert [line.split()[2:4] for line in lines[:5]] == [["e", "1"], ["b", "2"], ["a", "3"], ["c", "4"], ["d", "5"]]
    back = read_run(path)
    assert list(back) == ["q1", "q2"]
    for qid, docs in run.items():
        assert list(back[qid]) == [doc for doc, _ in ranking(docs)]
        for doc, score in docs.items():
            assert back[qid][doc] == pytest.approx(float(score), abs=1e-7, rel=1e-12)
    write_run(path, run, depth=2)
    assert read_run(path) == {"q1": {"e": 123456.78901234, "b": 0.5}, "q2": {"y": 3.0, "x": float(np.float32(0.1))}}
    assert truncate_run(run, 1) == {"q1": {"e": 123456.78901234}, "q2": {"y": 3}}


def test_interrupted_write_keeps_previous_file(tmp_path):
    class Exploding(dict):
        def items(self):
            raise RuntimeError("boom")

    path = tmp_path / "run.trec"
    write_run(path, {"q": {"a": 1.0}})
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        write_run(path, {"q": {"a": 2.0, "b": 1.0}, "r": Exploding(a=1.0)})
    with pytest.raises(ValueError, match="not finite"):
        write_run(path, {"q": {"a": 2.0, "b": float("inf")}})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["run.trec"]


@pytest.mark.parametrize("content, line, field", [
    ("q Q0 a 1 0.5 t\nq Q0 b 2 0.4\n", 2, None),
    ("q Q0 a 1 0.5 t\n\nq Q0 b x 0.4 t\n", 3, "rank"),
    ("q Q0 a 1 high t\n", 1, "score"),
    ("q Q0 a 1 nan t\n", 1, "score"),
    ("q Q0 a 1 inf t\n", 1, "score"),
    ("q Q0 a 1 0.5 t\r\nq Q0 b 2 0.4 t\r\nq Q0 a 3 0.3 t\r\n", 3, "doc_id"),
])
def test_read_run_errors(tmp_path, content, line, field):
    path = tmp_path / "bad.run"
    path.write_text(content, newline="")
    with pytest.raises(DataFormatError) as info:
        read_run(path)
    assert (info.value.path, info.value.line, info.value.field) == (str(path), line, field)


def test_read_run_accepts_bom_crlf_blank(tmp_path):
    path = tmp_path / "ok.run"
    path.write_bytes(b"\xef\xbb\xbfq1 Q0 a 1 0.5 t\r\n\r\n  \nq1\tQ0\tb\t2\t-1e-3\tt\r\n")
    assert read_run(path) == {"q1": {"a": 0.5, "b": -0.001}}


def test_read_trec_qrels(tmp_path):
    path = tmp_path / "qrels.txt"
    path.write_bytes(b"\xef\xbb\xbf1 0 a 2\r\n1 0 b -1\n\n2 0 a 0\n")
    assert read_trec_qrels(path) == {"1": {"a": 2, "b": -1}, "2": {"a": 0}}
    for content, line, field in [("1 0 a 1\n1 0 a 2\n", 2, "doc_id"), ("1 0 a 1.5\n", 1, "relevance"),
                                 ("1 0 a\n", 1, None)]:
        path.write_text(content)
        with pytest.raises(DataFormatError) as info:
            read_trec_qrels(path)
        assert (info.value.line, info.value.field) == (line, field)


def test_read_tsv_qrels(tmp_path):
    path = tmp_path / "test.tsv"
    path.write_bytes(b"query-id\tcorpus-id\tscore\r\n1\tdoc a\t1\r\n1\tb\t0\r\n2\ta\t2\r\n")
    expected = {"1": {"doc a": 1, "b": 0}, "2": {"a": 2}}
    assert read_tsv_qrels(path) == read_tsv_qrels(path, has_header=True) == expected
    path.write_text("1\ta\t1\n2\ta\t2\n")
    assert read_tsv_qrels(path) == {"1": {"a": 1}, "2": {"a": 2}}
    assert read_tsv_qrels(path, has_header=True) == {"2": {"a": 2}}
    for content, has_header, line, field in [
        ("query-id\tcorpus-id\tscore\n1\ta\t1\n", False, 1, "score"),
        ("q\tc\ts\n1\ta\t1\n\n1\ta\t2\n", None, 4, "corpus-id"),
        ("1\ta\t1\n2\tb\tone\n", None, 2, "score"),
        ("1\ta\t1\n2\tb\n", None, 2, None),
    ]:
        path.write_text(content)
        with pytest.raises(DataFormatError) as info:
            read_tsv_qrels(path, has_header=has_header)
        assert (info.value.line, info.value.field) == (line, field)


@pytest.mark.parametrize("name, rows, queries", [("scifact", 339, 300), ("msmarco-dl19-subset", 4102, 43)])
def test_real_qrels(name, rows, queries):
    path = Path("/work/shared/data") / name / "qrels" / "test.tsv"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    qrels = read_tsv_qrels(path)
    assert sum(len(docs) for docs in qrels.values()) == rows and len(qrels) == queries
