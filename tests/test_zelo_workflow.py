"""The ``research zelo`` steps as library calls: a votes job's settings file and resume check, fit, qrels groups."""

from __future__ import annotations

import json

import pytest

from research.errors import ResearchError
from research.zelo import read_scores, read_votes
from research.zelo.workflow import fit_votes_file, meta_path, prepare_votes, write_qrels_groups


@pytest.fixture(scope="module")
def beir(tmp_path_factory):
    from helpers import make_tiny_beir

    return make_tiny_beir(tmp_path_factory.mktemp("workflow_beir") / "tiny")


def test_a_votes_job_records_its_settings_and_names_what_changed_on_resume(beir, tmp_path):
    out = tmp_path / "votes.jsonl"
    specs = [{"type": "bm25", "temperature": 1.0}]
    job = prepare_votes(beir, "train", specs, out, top_n=4, cycles=2, max_queries=3)
    assert job.changed == [] and not out.exists() and not meta_path(out).exists()  # planning writes nothing
    stats = job.collect()
    assert (stats.planned, stats.already, stats.collected) == (len(job.pairs), 0, len(job.pairs))
    meta = json.loads(meta_path(out).read_text())
    assert meta == job.settings and meta["data"] == str(beir) and (meta["queries"], meta["pairs"]) == (3, len(job.pairs))
    assert len(read_votes(out)) == len(job.pairs)

    assert prepare_votes(beir, "train", specs, out, top_n=4, cycles=2, max_queries=3).changed == []
    assert prepare_votes(beir, "train", specs, out, top_n=4, cycles=3, max_queries=3).changed == ["cycles"]
    other = [{"type": "bm25", "temperature": 2.0}]
    assert prepare_votes(beir, "train", other, out, top_n=5, cycles=2, max_queries=3).changed == ["top_n", "judges"]

    scores, groups = tmp_path / "scores.jsonl", tmp_path / "groups.jsonl"
    fitted = fit_votes_file(out, scores, groups=groups)
    assert (fitted.votes, fitted.queries) == (len(job.pairs), 3) and fitted.scores == len(read_scores(scores)) == 12
    assert len(groups.read_text().splitlines()) == 3


def test_fit_needs_votes_and_qrels_groups_count_their_queries(beir, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ResearchError, match="no votes"):
        fit_votes_file(tmp_path / "empty.jsonl", tmp_path / "scores.jsonl")
    assert write_qrels_groups(beir, "train", tmp_path / "qrels.jsonl", top_n=4, max_queries=2) == 2
