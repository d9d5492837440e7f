"""A newcomer's first hour, nothing lost and small checks cheap: ``research fit`` refuses a run directory that holds a
finished run unless ``--overwrite``; ``--max-queries`` / ``--max-docs`` slices (judged and candidate documents
kept) on evaluate, bm25, rerank, mine and score; ``--relevance-level`` on bm25 and rerank."""

from __future__ import annotations

import json

import pytest

from research.cli.main import main
from research.cli.options import slice_corpus, slice_queries
from research.data.beir import load_dataset
from research.data.trec import read_run, write_run
from research.errors import ResearchError
from research.eval.evaluation import evaluate_run
from research.runs.resume import check_resume

FIT_YAML = """\
seed_everything: 1
trainer:
  max_steps: 1
  accelerator: cpu
  devices: 1
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
model:
  class_path: modules.BiEncoderModule
  init_args:
    model: {model}
data:
  class_path: datamodules.RetrievalDataModule
  init_args:
    data: {data}
    eval_split: null
    batch_size: 4
"""


# ------------------------------------------------------------------ a finished run is not replaced unasked
@pytest.mark.parametrize("marker", ["model", "eval_after", "FINISHED"])
def test_fit_refuses_a_run_dir_holding_a_finished_run(marker, tiny_model_dir, tiny_beir_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / marker).mkdir() if marker != "FINISHED" else (run_dir / marker).write_text("{}")
    (run_dir / "keep.txt").write_text("the finished run's files")
    config = tmp_path / "fit.yaml"
    config.write_text(FIT_YAML.format(model=tiny_model_dir, data=tiny_beir_dir))
    assert main(["fit", "--config", str(config), "--run_dir", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    shown = f"{marker}/" if marker != "FINISHED" else marker
    assert err == [f"research: error: {run_dir} holds a finished run ({shown}): a new fit would replace it; pass "
                   "--overwrite true to replace it, or choose another --run_dir"]
    assert sorted(p.name for p in run_dir.iterdir()) == sorted([marker, "keep.txt"])


def test_overwrite_and_resume_are_the_ways_past_the_guard(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "model").mkdir(parents=True)
    with pytest.raises(ResearchError, match="holds a finished run"):
        check_resume("fit", run_dir, None)
    check_resume("fit", run_dir, None, overwrite=True)
    check_resume("test", run_dir, None)  # only fit replaces a run
    check_resume("fit", tmp_path / "new", None)


def test_overwrite_flag_parses_each_spelling(tiny_model_dir, tiny_beir_dir, tmp_path, monkeypatch):
    from research.cli import lightning

    seen = []
    monkeypatch.setattr("research.runs.resume.check_resume", lambda *a, **kw: seen.append(kw["overwrite"]))
    config = tmp_path / "fit.yaml"
    config.write_text(FIT_YAML.format(model=tiny_model_dir, data=tiny_beir_dir))
    for flags in ([], ["--overwrite"], ["--overwrite", "true"], ["--overwrite=false"], ["--no_overwrite"]):
        cli = lightning._research_cli(parse_only=False)
        cli.before_instantiate_classes = lambda self: (_ for _ in ()).throw(lightning.ParsedOnly())
        with pytest.raises(lightning.ParsedOnly):
            cli(args=["fit", "--config", str(config), "--run_dir", str(tmp_path / "r"), *flags],
                **lightning._cli_kwargs())
    assert seen == [False, True, True, False, False]


# ------------------------------------------------------------------ slices
def test_slices_keep_judged_and_candidate_documents(tiny_beir_dir):
    data = load_dataset(tiny_beir_dir, "test")
    sliced = slice_queries(data, 3)
    assert list(sliced.queries) == list(data.judged_queries)[:3] and set(sliced.qrels) == set(sliced.queries)
    judged = {d for docs in sliced.qrels.values() for d in docs}
    small = slice_corpus(sliced, 2)  # fewer than the judged documents: all judged are kept, nothing else
    assert set(small.corpus) == judged
    keep = [d for d in data.corpus if d not in judged][-2:]
    bigger = slice_corpus(sliced, 10, keep=keep)
    assert judged | set(keep) <= set(bigger.corpus) and len(bigger.corpus) == 10
    assert list(bigger.corpus) == [d for d in data.corpus if d in bigger.corpus]  # corpus order kept
    assert slice_queries(data, None) is data and slice_corpus(data, None) is data


def test_bm25_and_evaluate_on_a_slice(tiny_model_dir, tiny_beir_dir, tmp_path, capsys):
    assert main(["bm25", "--data", str(tiny_beir_dir), "--out", str(tmp_path / "b"), "--max-queries", "3",
                 "--max-docs", "10"]) == 0
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert (metrics["num_queries"], metrics["max_queries"], metrics["max_docs"], metrics["num_documents"]) == (3, 3, 10, 10)
    run = read_run(tmp_path / "b" / "run.trec")
    assert list(run) == list(load_dataset(tiny_beir_dir, "test").judged_queries)[:3]
    assert len({d for docs in run.values() for d in docs}) <= 10
    assert "(slice: 3 queries, 10 documents)" in capsys.readouterr().out
    assert main(["evaluate", "--model", str(tiny_model_dir), "--data", str(tiny_beir_dir), "--out", str(tmp_path / "e"),
                 "--max-queries", "2", "--max-docs", "8"]) == 0
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["num_queries"] == 2 and metrics["num_documents"] == 8
    assert len(read_run(tmp_path / "e" / "run.trec")) == 2
    assert main(["bm25", "--data", str(tiny_beir_dir), "--out", str(tmp_path / "x"), "--max-queries", "0"]) == 2
    assert "argument --max-queries: expected a positive integer, got 0" in capsys.readouterr().err


@pytest.fixture(scope="module")
def cross_encoder_dir(tiny_model_dir, tmp_path_factory):
    from research.models.cross_encoder import CrossEncoder

    model = tmp_path_factory.mktemp("ce") / "ce"
    CrossEncoder.from_pretrained(tiny_model_dir).save_pretrained(model)
    return model


def test_rerank_slice_keeps_a_run_files_candidates(cross_encoder_dir, tiny_beir_dir, tmp_path):
    model = cross_encoder_dir
    data = load_dataset(tiny_beir_dir, "test")
    first = list(data.judged_queries)[:2]
    candidates = {q: {d: float(-i) for i, d in enumerate(list(data.corpus)[-6:])} for q in data.judged_queries}
    write_run(tmp_path / "cand.trec", candidates)
    assert main(["rerank", "--model", str(model), "--data", str(tiny_beir_dir), "--candidates",
                 str(tmp_path / "cand.trec"), "--top-k", "6", "--out", str(tmp_path / "r"), "--max-queries", "2",
                 "--max-docs", "3"]) == 0  # 3 documents asked, but the 6 candidates and the judged ones stay
    run = read_run(tmp_path / "r" / "run.trec")
    assert list(run) == first and all(set(run[q]) == set(candidates[q]) for q in first)
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    judged = {d for q in first for d in data.qrels[q]}
    assert metrics["num_documents"] == len(judged | set(candidates[first[0]])) and metrics["max_docs"] == 3


def test_mine_and_score_on_a_slice(tiny_model_dir, cross_encoder_dir, tiny_beir_dir, tmp_path):
    groups = tmp_path / "groups.jsonl"
    assert main(["mine", "--model", str(tiny_model_dir), "--data", str(tiny_beir_dir), "--split", "train",
                 "--out", str(groups), "--max-queries", "3", "--max-docs", "12", "--depth", "5"]) == 0
    records = [json.loads(line) for line in groups.read_text().splitlines()]
    assert [r["query_id"] for r in records] == list(load_dataset(tiny_beir_dir, "train").judged_queries)[:3]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query_id": r["query_id"], "doc_id": d}) + "\n"
                             for r in records for d in r["negatives"][:2]))
    scored = tmp_path / "scored.jsonl"
    assert main(["score", "--model", str(cross_encoder_dir), "--pairs", str(pairs), "--data", str(tiny_beir_dir),
                 "--out", str(scored), "--max-queries", "2"]) == 0
    out = [json.loads(line) for line in scored.read_text().splitlines()]
    assert [r["query_id"] for r in out] == [records[0]["query_id"]] * 2 + [records[1]["query_id"]] * 2
    assert all(isinstance(r["score"], float) for r in out)


# ------------------------------------------------------------------ relevance level
def test_bm25_and_rerank_pass_the_relevance_level(cross_encoder_dir, tiny_beir_dir, tmp_path):
    data = load_dataset(tiny_beir_dir, "test")  # graded: one document of grade 2 and one of grade 1 per query
    assert main(["bm25", "--data", str(tiny_beir_dir), "--out", str(tmp_path / "b1")]) == 0
    assert main(["bm25", "--data", str(tiny_beir_dir), "--out", str(tmp_path / "b2"), "--relevance-level", "2"]) == 0
    one, two = (json.loads((tmp_path / f"b{k}" / "metrics.json").read_text()) for k in (1, 2))
    run = read_run(tmp_path / "b2" / "run.trec")
    expected = evaluate_run(run, data.qrels, relevance_level=2).metrics.aggregate
    assert two["relevance_level"] == 2 and two["AP@100"] == pytest.approx(expected["AP@100"])
    assert two["AP@100"] != one["AP@100"]
    assert main(["rerank", "--model", str(cross_encoder_dir), "--data", str(tiny_beir_dir), "--top-k", "5",
                 "--out", str(tmp_path / "r2"), "--relevance-level", "2"]) == 0
    reranked = json.loads((tmp_path / "r2" / "metrics.json").read_text())
    expected = evaluate_run(read_run(tmp_path / "r2" / "run.trec"), data.qrels, relevance_level=2).metrics.aggregate
    assert reranked["relevance_level"] == 2 and reranked["RR@10"] == pytest.approx(expected["RR@10"])
