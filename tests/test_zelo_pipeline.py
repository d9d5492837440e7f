"""The zELO loop on a tiny BEIR folder: candidates -> pairs -> judge votes (resumable) -> fit -> a student step."""

from __future__ import annotations

import json

import pytest
import torch

from research.cli.main import main
from research.errors import ResearchError
from research.seeds import key_seed
from research.zelo import read_scores, read_votes, sample_pairs
from research.zelo.judges import (
    BM25Scorer,
    Ensemble,
    ScoreJudge,
    build_ensemble,
    parse_judge_spec,
    read_judge_specs,
)
from research.zelo.pipeline import (
    candidate_lists,
    collect_votes,
    plan_pairs,
    qrels_groups,
    scores_to_groups,
)


@pytest.fixture(scope="module")
def beir(tmp_path_factory):
    from helpers import make_tiny_beir

    return make_tiny_beir(tmp_path_factory.mktemp("zelo_beir") / "tiny")


@pytest.fixture(scope="module")
def data(beir):
    from research.data.beir import load_dataset

    return load_dataset(beir, "train")


@pytest.fixture(scope="module")
def ce_dir(tmp_path_factory, tiny_model_dir):
    from research.models.cross_encoder import CrossEncoder

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("zelo_ce") / "ce"
    CrossEncoder.from_pretrained(tiny_model_dir, max_length=64, query_max_length=16).save_pretrained(directory)
    return directory


class CountingJudge(ScoreJudge):
    """Scores by word overlap with the query; counts the pairs it judged."""

    def __init__(self):
        class Overlap:
            def score_pairs(self, queries, documents, batch_size=32):
                return torch.tensor([float(len(set(q.split()) & set(d.split()))) for q, d in zip(queries, documents)])

        super().__init__(Overlap(), temperature=0.5, name="overlap")
        self.judged = 0

    def judge_pairs(self, queries, docs_a, docs_b):
        self.judged += len(queries)
        return super().judge_pairs(queries, docs_a, docs_b)


# ---- specs ---------------------------------------------------------------------------------------------------------

def test_judge_specs(tmp_path):
    assert parse_judge_spec("bm25:temperature=1.0") == {"type": "bm25", "temperature": 1.0}
    assert parse_judge_spec("model:runs/ce/model:temperature=0.1:name=ce") == {
        "type": "model", "path": "runs/ce/model", "temperature": 0.1, "name": "ce"}
    assert parse_judge_spec("llm:http://127.0.0.1:8000/v1:qwen:MY_KEY:timeout=5") == {
        "type": "llm", "base_url": "http://127.0.0.1:8000/v1", "model": "qwen", "api_key_env": "MY_KEY", "timeout": 5}
    assert parse_judge_spec("llm:http://h/v1:m:")["api_key_env"] is None
    for bad in ("bm25:x", "model", "llm:http://h/v1", "foo:bar"):
        with pytest.raises(ResearchError):
            parse_judge_spec(bad)
    (tmp_path / "j.yaml").write_text("judges:\n  - bm25:temperature=2\n  - {type: model, path: d, temperature: 0.5}\n")
    assert read_judge_specs(tmp_path / "j.yaml") == [{"type": "bm25", "temperature": 2},
                                                     {"type": "model", "path": "d", "temperature": 0.5}]
    (tmp_path / "k.json").write_text(json.dumps([{"type": "llm", "base_url": "http://h", "model": "m", "api_key": "x"}]))
    with pytest.raises(ResearchError, match="api_key_env"):
        read_judge_specs(tmp_path / "k.json")


# ---- candidates, pairs, judges ---------------------------------------------------------------------------------------

def test_candidates_and_pairs_are_seeded_per_query(data):
    candidates = candidate_lists(data, "bm25", 5)
    assert list(candidates) == list(data.judged_queries)
    assert all(len(docs) == 5 for docs in candidates.values())
    pairs = plan_pairs(candidates, cycles=2, seed=7)
    assert pairs == plan_pairs(candidates, cycles=2, seed=7) and pairs != plan_pairs(candidates, cycles=2, seed=8)
    first = next(iter(candidates))
    assert [(p.doc_a, p.doc_b) for p in pairs if p.query_id == first] == sample_pairs(
        candidates[first], 2, seed=key_seed(7, first))
    assert len(plan_pairs(candidates, all_pairs=True)) == 10 * len(candidates)


def test_bm25_judge_agrees_with_bm25_search(data):
    from research.retrieval.bm25 import bm25_search

    query_id = next(iter(data.judged_queries))
    run = bm25_search(data, k=5, query_ids=[query_id], show_progress=False)[query_id]
    docs = list(run)
    scores = BM25Scorer(data).score_pairs([data.queries[query_id]] * 5, [data.corpus[d].full_text for d in docs])
    assert scores.tolist() == pytest.approx([run[d] for d in docs], rel=1e-5)
    judge = build_ensemble([{"type": "bm25", "temperature": 1.0}], data).judges[0]
    p = judge.judge(data.queries[query_id], data.corpus[docs[0]].full_text, data.corpus[docs[-1]].full_text)
    assert p == pytest.approx(float(torch.sigmoid(torch.tensor(run[docs[0]] - run[docs[-1]]))), rel=1e-5)


def test_ensemble_averages_and_names_must_be_distinct():
    class Fixed:
        def __init__(self, value):
            self.value = value

        def score_pairs(self, queries, documents, batch_size=32):
            return torch.tensor([self.value if d == "a" else 0.0 for d in documents])

    ensemble = Ensemble([ScoreJudge(Fixed(100.0), name="x"), ScoreJudge(Fixed(-100.0), name="y")], weights=[3, 1])
    p, votes = ensemble.judge_votes(["q"], ["a"], ["b"])
    assert votes == [{"x": 1.0, "y": pytest.approx(0.0)}] and p == [pytest.approx(0.75)]
    with pytest.raises(ValueError, match="distinct"):
        Ensemble([ScoreJudge(Fixed(1.0), name="x"), ScoreJudge(Fixed(1.0), name="x")])


# ---- resume ---------------------------------------------------------------------------------------------------------

def test_resume_after_a_crash_collects_only_the_missing_pairs(data, tmp_path):
    pairs = plan_pairs(candidate_lists(data, "bm25", 4), cycles=2, seed=0)
    out = tmp_path / "votes.jsonl"

    class Crash(Exception):
        pass

    judge = CountingJudge()

    def crash_after(done, total):
        if done >= 10:
            raise Crash

    with pytest.raises(Crash):
        collect_votes(data, pairs, judge, out, batch_size=5, progress=crash_after)
    assert len(read_votes(out)) == 10
    with open(out, "a", encoding="utf-8") as handle:  # a line cut short by the crash
        handle.write('{"query_id": "' + pairs[10].query_id + '", "doc_a": "x')
    assert len(read_votes(out, allow_truncated_tail=True)) == 10

    again = CountingJudge()
    stats = collect_votes(data, pairs, again, out, batch_size=5)
    assert (stats.planned, stats.already, stats.collected, stats.missing) == (len(pairs), 10, len(pairs) - 10, 0)
    assert again.judged == len(pairs) - 10
    votes = read_votes(out)  # the partial line is gone, every planned pair is there exactly once
    assert [(v.query_id, v.doc_a, v.doc_b) for v in votes] == [(p.query_id, p.doc_a, p.doc_b) for p in pairs]
    assert all(set(v.judges) == {"overlap"} for v in votes)
    assert collect_votes(data, pairs, CountingJudge(), out).collected == 0


def test_a_failing_llm_judge_keeps_the_votes_already_collected(data, tmp_path):
    from research.zelo.judges import JudgeError

    class Failing(CountingJudge):
        def judge_pairs(self, queries, docs_a, docs_b):
            if self.judged >= 6:
                raise JudgeError("endpoint down")
            return super().judge_pairs(queries, docs_a, docs_b)

    pairs = plan_pairs(candidate_lists(data, "bm25", 4), cycles=2, seed=0)
    out = tmp_path / "votes.jsonl"
    with pytest.raises(JudgeError):
        collect_votes(data, pairs, Failing(), out, batch_size=3)
    assert len(read_votes(out)) == 6
    assert collect_votes(data, pairs, CountingJudge(), out, batch_size=3).collected == len(pairs) - 6


# ---- end to end -------------------------------------------------------------------------------------------------------

def test_votes_fit_and_one_student_step_end_to_end(beir, ce_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    votes, scores, groups = tmp_path / "votes.jsonl", tmp_path / "scores.jsonl", tmp_path / "groups.jsonl"
    command = ["zelo", "votes", "--data", str(beir), "--split", "train", "--candidates", "bm25", "--top-n", "4",
               "--cycles", "2", "--max-queries", "6", "--judge", "bm25:temperature=1.0",
               "--judge", f"model:{ce_dir}:temperature=0.1:name=ce", "--out", str(votes), "--device", "cpu", "--quiet"]
    assert main(command) == 0
    collected = read_votes(votes)
    assert 6 * 4 <= len(collected) <= 6 * 6  # 2 cycles over 4 documents: 4 to 6 distinct pairs per query
    assert all(set(v.judges) == {"bm25", "ce"} for v in collected)
    assert all(v.p == pytest.approx((v.judges["bm25"] + v.judges["ce"]) / 2) for v in collected)
    meta = json.loads((tmp_path / "votes.jsonl.meta.json").read_text())
    assert meta["pairs"] == len(collected) and [j["name"] for j in meta["judges"]["judges"]] == ["bm25", "ce"]

    capsys.readouterr()
    assert main(command) == 0  # resumed: nothing left to judge
    assert "0 collected" in capsys.readouterr().out and len(read_votes(votes)) == len(collected)

    assert main(["zelo", "fit", "--votes", str(votes), "--out", str(scores), "--groups", str(groups)]) == 0
    records = read_scores(scores)
    assert len({r["query_id"] for r in records}) == 6 and all(0 < r["target"] < 1 for r in records)
    lines = [json.loads(line) for line in groups.read_text().splitlines()]
    assert lines == scores_to_groups(records) and all(len(g["doc_ids"]) == 4 for g in lines)
    # per query the Elo scores are centred (no anchors), and BM25's favourite wins for a BM25-heavy ensemble
    for g in lines:
        assert sum(g["elo"]) == pytest.approx(0.0, abs=1e-6)

    run_dir = tmp_path / "student"
    assert main(["zelo", "train", "--config", "experiments/zelo/student.yaml", "--run_dir", str(run_dir),
                 "--model.init_args.model", str(ce_dir), "--model.init_args.max_length", "64",
                 "--model.init_args.query_max_length", "16", "--data.init_args.data", str(beir),
                 "--data.init_args.groups_file", str(groups), "--data.init_args.batch_size", "2",
                 "--data.init_args.eval_top_k", "4", "--trainer.max_steps", "1", "--trainer.accelerator", "cpu",
                 "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                 "--test_after_fit", "false"]) == 0
    assert (run_dir / "model" / "research_cross_encoder.json").is_file()
    metrics = (run_dir / "metrics.csv") if (run_dir / "metrics.csv").is_file() else None
    if metrics is not None:
        assert "train/loss" in metrics.read_text()


def test_qrels_groups_label_the_same_candidates(data):
    candidates = candidate_lists(data, "bm25", 4)
    groups = qrels_groups(data, candidates)
    assert [g["doc_ids"] for g in groups] == list(candidates.values())
    assert any(1.0 in g["labels"] for g in groups)
    for g in groups:
        assert g["labels"] == [float(data.qrels[g["query_id"]].get(d, 0) >= 1) for d in g["doc_ids"]]


def test_qrels_groups_command(beir, tmp_path):
    out = tmp_path / "qrels_groups.jsonl"
    assert main(["zelo", "qrels-groups", "--data", str(beir), "--top-n", "4", "--max-queries", "3", "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 3 and all(len(g["labels"]) == 4 for g in lines)


def test_qrels_labels_added_to_a_zelo_groups_file(beir, data, tmp_path, capsys):
    """--groups-from keeps the teacher's groups (queries, documents, order, fields) and adds the qrels' labels, so two
    students that differ only in the label field read the same candidates."""
    judged = list(data.judged_queries)[:2]
    zelo = [{"query_id": q, "doc_ids": docs[::-1], "target": [0.9, 0.1][: len(docs)] + [0.5] * (len(docs) - 2),
             "logit": [2.0] * len(docs)} for q, docs in candidate_lists(data, "bm25", 3, judged).items()]
    source = tmp_path / "zelo_groups.jsonl"
    source.write_text("".join(json.dumps(g) + "\n" for g in zelo))
    out = tmp_path / "both.jsonl"
    assert main(["zelo", "qrels-groups", "--data", str(beir), "--groups-from", str(source), "--out", str(out)]) == 0
    both = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: v for k, v in g.items() if k != "labels"} for g in both] == zelo
    for g in both:
        assert g["labels"] == [float(data.qrels[g["query_id"]].get(d, 0) >= 1) for d in g["doc_ids"]]
    # flags that choose candidates contradict --groups-from: refused, not ignored
    assert main(["zelo", "qrels-groups", "--data", str(beir), "--groups-from", str(source), "--top-n", "5",
                 "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "drop --top-n" in capsys.readouterr().err
    # a query without qrels in the split (here: a query of no split) names the file and the line
    source.write_text(json.dumps(zelo[0]) + "\n" + json.dumps({**zelo[1], "query_id": "no-such-query"}) + "\n")
    assert main(["zelo", "qrels-groups", "--data", str(beir), "--groups-from", str(source), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{source}:2: field 'query_id'" in err and "no-such-query" in err


def test_votes_command_needs_a_judge(beir, tmp_path, capsys):
    assert main(["zelo", "votes", "--data", str(beir), "--out", str(tmp_path / "v.jsonl")]) == 2
    assert "--judge" in capsys.readouterr().err
