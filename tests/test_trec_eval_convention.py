"""trec_eval's convention for queries without a relevant document (issue 17 §4.6) reaches every place that scores:
``--queries-without-relevant`` on bm25 / evaluate / search / rerank, the DataModules' option (so ``fit`` and
``test`` validate and test under it) and a baselines row's key. The reference is pytrec_eval on the same run."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import pytrec_eval

from datamodules.retrieval import RetrievalDataModule
from research.cli.main import main
from research.data.beir import load_dataset
from research.data.trec import read_run, write_run
from research.errors import ResearchError
from research.runs.reproduce import BaselineError, load_baselines, score_run

PYTREC = {"nDCG@10": "ndcg_cut_10", "R@100": "recall_100", "AP@100": "map_cut_100"}


def one_query_below_level(tiny_beir_dir: Path, tmp_path: Path) -> Path:
    """The tiny BEIR folder with the first test query's grade-2 judgments lowered to 1: no relevant document at
    relevance level 2, while trec_eval still scores it (0 on R and AP, nDCG from the grade-1 gains)."""
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_beir_dir, folder)
    lines = (folder / "qrels" / "test.tsv").read_text().splitlines()
    first = lines[1].split("\t")[0]
    fixed = [lines[0]] + ["\t".join([q, d, "1" if q == first else g])
                          for q, d, g in (line.split("\t") for line in lines[1:])]
    (folder / "qrels" / "test.tsv").write_text("\n".join(fixed) + "\n")
    return folder


def pytrec_means(run, qrels, level: int) -> dict[str, float]:
    """trec_eval -c: the mean over every qrels query (a query missing from the run scores 0)."""
    reference = pytrec_eval.RelevanceEvaluator(qrels, set(PYTREC.values()), relevance_level=level).evaluate(run)
    return {name: math.fsum(reference.get(q, {}).get(measure, 0.0) for q in qrels) / len(qrels)
            for name, measure in PYTREC.items()}


def test_bm25_flag_gives_pytrec_evals_means(tiny_beir_dir, tmp_path):
    data_dir = one_query_below_level(tiny_beir_dir, tmp_path)
    qrels = load_dataset(data_dir, "test").qrels
    common = ["bm25", "--data", str(data_dir), "--relevance-level", "2"]
    assert main([*common, "--out", str(tmp_path / "excluded")]) == 0
    assert main([*common, "--out", str(tmp_path / "trec"), "--queries-without-relevant", "trec_eval"]) == 0
    excluded, trec = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("excluded", "trec"))
    assert excluded["num_queries"] == len(qrels) - 1 and excluded["skipped_queries_without_relevant"] == 1
    assert trec["num_queries"] == len(qrels) and trec["queries_without_relevant"] == "trec_eval"
    expected = pytrec_means(read_run(tmp_path / "trec" / "run.trec"), qrels, 2)
    for name, value in expected.items():
        assert trec[name] == pytest.approx(value, abs=1e-12), name
    assert trec["AP@100"] < excluded["AP@100"]  # the added query scores 0 on AP


def test_an_unknown_convention_is_refused(tiny_beir_dir, tmp_path, capsys):
    code = main(["bm25", "--data", str(tiny_beir_dir), "--out", str(tmp_path / "x"), "--queries-without-relevant", "all"])
    assert code == 2 and "invalid choice: 'all'" in capsys.readouterr().err
    with pytest.raises(ResearchError, match="queries_without_relevant='all'"):
        RetrievalDataModule(str(tiny_beir_dir), queries_without_relevant="all")


def test_evaluate_and_the_module_test_loop_use_the_datamodules_convention(tiny_model_dir, tiny_beir_dir, tmp_path):
    data_dir = one_query_below_level(tiny_beir_dir, tmp_path)
    qrels = load_dataset(data_dir, "test").qrels
    assert main(["evaluate", "--model", str(tiny_model_dir), "--data", str(data_dir), "--out", str(tmp_path / "e"),
                 "--relevance-level", "2", "--queries-without-relevant", "trec_eval"]) == 0
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["num_queries"] == len(qrels)
    for name, value in pytrec_means(read_run(tmp_path / "e" / "run.trec"), qrels, 2).items():
        assert metrics[name] == pytest.approx(value, abs=1e-12), name


def test_a_baselines_row_scores_under_its_convention(tiny_beir_dir, tmp_path):
    data_dir = one_query_below_level(tiny_beir_dir, tmp_path)
    qrels = load_dataset(data_dir, "test").qrels
    run = {q: {d: 1.0 / (i + 1) for i, d in enumerate(sorted(docs))} for q, docs in qrels.items()}
    write_run(tmp_path / "run.trec", run)
    path = tmp_path / "baselines.yaml"
    path.write_text(f"data: {data_dir}\nrelevance_level: 2\nrows:\n"
                    "  - {name: a, kind: bm25, metrics: {AP@100: null}}\n"
                    "  - {name: b, kind: bm25, queries_without_relevant: trec_eval, metrics: {AP@100: null}}\n")
    _, (excluded, trec) = load_baselines(path)
    expected = pytrec_means(read_run(tmp_path / "run.trec"), qrels, 2)["AP@100"]
    assert score_run(trec, tmp_path / "run.trec")["AP@100"] == pytest.approx(expected, abs=1e-12)
    assert score_run(excluded, tmp_path / "run.trec")["AP@100"] == pytest.approx(expected * len(qrels) / (len(qrels) - 1))
    path.write_text(f"data: {data_dir}\nrows:\n"
                    "  - {name: a, kind: bm25, queries_without_relevant: every, metrics: {AP@100: null}}\n")
    with pytest.raises(BaselineError, match="queries_without_relevant.*'every' is not one of exclude, trec_eval"):
        load_baselines(path)
