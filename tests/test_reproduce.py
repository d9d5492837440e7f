"""Baseline rows: one class per kind with its exact command, the file's validation, pass/fail against tolerances,
relevance levels, the markdown table and the exit code; one real `research bm25` row on a tiny dataset."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from research.data.trec import write_run
from research.eval.metrics import compute_metrics
from research.runs import layout
from research.runs.reproduce import (
    BaselineError,
    BM25Row,
    DenseEvalRow,
    FitEvalRow,
    RerankRow,
    load_baselines,
    reproduce,
    score_run,
)

ROOT = Path(__file__).resolve().parents[1]


def write_file(tmp_path: Path, rows: list[dict], **top) -> Path:
    path = tmp_path / "baselines.yaml"
    path.write_text(yaml.safe_dump({"data": str(tmp_path / "data"), "split": "test", "tolerance": 0.01, **top,
                                    "rows": rows}, sort_keys=False))
    return path


def test_each_kind_is_a_small_class_with_its_command(tmp_path):
    path = write_file(tmp_path, [
        {"name": "bm25", "kind": "bm25", "k1": 0.9, "b": 0.4, "metrics": {"ndcg@10": 0.5}},
        {"name": "dense", "kind": "dense", "model": "m", "precision": "bf16-mixed", "max_length": 64,
         "metrics": {"nDCG@10": {"expected": 0.6, "published": 0.61, "tolerance": 0.001}}},
        {"name": "fit", "kind": "fit", "configs": "a.yaml", "args": ["--trainer.max_steps=3"], "metrics": {"RR@10": None}},
        {"name": "rerank", "kind": "rerank", "train": ["ce.yaml"], "top_k": 50, "relevance_level": 2,
         "metrics": {"AP@100": None}, "enabled": False},
    ])
    _, rows = load_baselines(path)
    assert [type(r) for r in rows] == [BM25Row, DenseEvalRow, FitEvalRow, RerankRow]
    out = Path("OUT")
    data = str(tmp_path / "data")
    assert rows[0].command(out) == ["bm25", "--data", data, "--split", "test", "--out", "OUT", "--top-k", "100",
                                    "--k1", "0.9", "--b", "0.4"]
    assert rows[0].metrics[0].name == "nDCG@10" and rows[0].metrics[0].tolerance == 0.01  # the file's default
    assert rows[1].command(out)[-2:] == ["--max-length", "64"] and "bf16-mixed" in rows[1].command(out)
    assert (rows[1].metrics[0].expected, rows[1].metrics[0].published, rows[1].metrics[0].tolerance) == (0.6, 0.61, 0.001)
    assert rows[2].command(out) == ["fit", "--config", "a.yaml", "--run_dir", "OUT", "--name", "fit",
                                    "--trainer.max_steps=3"]
    assert rows[2].run_path(out) == out / "eval_after" / "run.trec"
    fit, rerank = rows[3].commands(out)
    assert fit[:4] == ["research", "fit", "--config", "ce.yaml"] and fit[fit.index("--run_dir") + 1] == "OUT/train"
    assert rerank[:4] == ["research", "rerank", "--model", "OUT/train/model"]
    assert rerank[rerank.index("--top-k") + 1] == "50"
    assert rows[3].relevance_level == 2 and not rows[3].enabled
    assert rows[3].run_path(out) == out / "run.trec"
    fused = RerankRow(name="fused", data=data, model="ce", interpolate=0.5)
    assert fused.command(out)[-2:] == ["--interpolate", "0.5"]
    assert fused.run_path(out) == out / "interpolated" / "run.trec" and "interpolated 0.5/0.5" in fused.describe()
    chosen = RerankRow(name="chosen", data=data, model="ce", interpolate_on="dev")
    assert chosen.command(out)[-2:] == ["--interpolate-on", "dev"] and "--interpolate" not in chosen.command(out)
    assert chosen.run_path(out) == out / "interpolated" / "run.trec" and "weight chosen on dev" in chosen.describe()


@pytest.mark.parametrize("row, message", [
    ({"name": "x", "kind": "magic", "metrics": {"nDCG@10": 1}}, "unknown kind"),
    ({"name": "x", "kind": "bm25", "metrics": {"nDCG@10": 1}, "model": "m"}, "unknown key"),
    ({"name": "x", "kind": "bm25"}, "'metrics'"),
    ({"name": "x", "kind": "bm25", "metrics": {"MRR": 1}}, "unknown metric"),
    ({"name": "x", "kind": "dense", "metrics": {"nDCG@10": 1}}, "'model' is required"),
    ({"name": "x", "kind": "rerank", "metrics": {"nDCG@10": 1}}, "'model' or 'train'"),
    ({"name": "x", "kind": "rerank", "model": "m", "interpolate": 0.5, "interpolate_on": "dev",
      "metrics": {"nDCG@10": 1}}, "not both"),
    ({"kind": "bm25", "metrics": {"nDCG@10": 1}}, "without a 'name'"),
])
def test_invalid_rows_are_refused(tmp_path, row, message):
    with pytest.raises(BaselineError, match=message):
        load_baselines(write_file(tmp_path, [row]))


def test_duplicate_names_are_refused(tmp_path):
    row = {"name": "x", "kind": "bm25", "metrics": {"nDCG@10": 1}}
    with pytest.raises(BaselineError, match="duplicate"):
        load_baselines(write_file(tmp_path, [row, row]))


def graded_data(tmp_path: Path) -> Path:
    """Two queries with graded judgments (1 and 2) in BEIR format; q2 has more relevant documents than depth 5."""
    folder = tmp_path / "data"
    (folder / "qrels").mkdir(parents=True)
    rows = [("q1", "a", 2), ("q1", "b", 1), ("q1", "c", 1)] + [("q2", f"d{i}", 2 if i % 2 else 1) for i in range(8)]
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{g}\n" for q, d, g in rows))
    return folder


def test_relevance_level_and_pass_fail_exit_code(tmp_path, capsys):
    graded_data(tmp_path)
    run = {"q1": {"b": 3.0, "c": 2.0, "a": 1.0}, "q2": {f"d{i}": 10.0 - i for i in range(8)}}
    qrels = {"q1": {"a": 2, "b": 1, "c": 1}, "q2": {f"d{i}": 2 if i % 2 else 1 for i in range(8)}}
    level1 = compute_metrics(run, qrels, ["nDCG@5", "R@2", "AP@5"], relevance_level=1).aggregate
    level2 = compute_metrics(run, qrels, ["nDCG@5", "R@2", "AP@5"], relevance_level=2).aggregate
    assert level1["R@2"] != level2["R@2"] and level1["nDCG@5"] == level2["nDCG@5"]  # nDCG: graded gains, any level
    rows = [
        {"name": "good", "kind": "bm25", "relevance_level": 2,
         "metrics": {"R@2": level2["R@2"], "nDCG@5": {"expected": level2["nDCG@5"] + 0.005}, "AP@5": None}},
        {"name": "off", "kind": "bm25", "relevance_level": 1, "metrics": {"R@2": {"expected": level2["R@2"],
                                                                                     "tolerance": 0.001}}},
        {"name": "off-disabled", "kind": "bm25", "enabled": False, "metrics": {"R@2": 0.0}},
    ]
    path = write_file(tmp_path, rows)
    for name in ("good", "off"):
        write_run(tmp_path / "out" / name / "run.trec", run)
    _, parsed = load_baselines(path)
    assert score_run(parsed[0], tmp_path / "out" / "good" / "run.trec") == pytest.approx(level2)
    assert reproduce(path, only=["good"], out=tmp_path / "out", reuse=True) == 0
    assert reproduce(path, out=tmp_path / "out", reuse=True, table=tmp_path / "table.md") == 1  # "off" is outside
    text = (tmp_path / "table.md").read_text()
    assert "| good | BM25 (bm25s, k1=1.5, b=0.75) | R@2 (rel ≥ 2) |" in text
    assert "| off | BM25 (bm25s, k1=1.5, b=0.75) | R@2 | — |" in text and "| FAIL (reused) |" in text
    assert "| off-disabled |" in text and "skipped" in text
    assert "| measured (reused) |" in text  # AP@5 without an expected value
    assert "[off] FAIL" in capsys.readouterr().out
    with pytest.raises(BaselineError, match="no row named"):
        reproduce(path, only=["nope"], out=tmp_path / "out")


def test_failing_command_is_an_error_row(tmp_path, monkeypatch):
    graded_data(tmp_path)
    monkeypatch.setattr(layout, "RESEARCH_PROGRAM", ["false"])
    path = write_file(tmp_path, [{"name": "broken", "kind": "bm25", "metrics": {"nDCG@10": 0.5}}])
    assert reproduce(path, out=tmp_path / "out") == 1
    assert "exit code 1" in (tmp_path / "out" / "reproduce.md").read_text()


def test_real_bm25_row_on_a_tiny_dataset(tmp_path, monkeypatch):
    from helpers import make_tiny_beir

    data = make_tiny_beir(tmp_path / "data")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.chdir(tmp_path)
    path = write_file(tmp_path, [{"name": "bm25", "kind": "bm25", "metrics": {"nDCG@10": None, "R@100": None}}],
                      data=str(data))
    assert reproduce(path, out=tmp_path / "out") == 0
    _, rows = load_baselines(path)
    measured = score_run(rows[0], tmp_path / "out" / "bm25" / "run.trec")
    assert 0.3 < measured["nDCG@10"] <= 1.0
    # fix the measured value as expected: the row now passes, and fails once the expectation moves
    for expected, code in ((measured["nDCG@10"], 0), (measured["nDCG@10"] + 0.05, 1)):
        path = write_file(tmp_path, [{"name": "bm25", "kind": "bm25", "metrics": {"nDCG@10": expected}}], data=str(data))
        assert reproduce(path, out=tmp_path / "out", reuse=True) == code
