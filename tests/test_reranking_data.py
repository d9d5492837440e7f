"""Re-ranking DataModules: listwise, pairwise, pointwise and candidate groups, their batches and file validation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from datamodules.reranking import (
    CandidateGroupsDataModule,
    ListwiseDataModule,
    PairBatch,
    PairGroupBatch,
    PairwiseDataModule,
    PointwiseDataModule,
    RerankingDataModule,
)
from research.data.beir import load_dataset
from research.data.candidates import candidate_pairs
from research.data.formats import (
    read_listwise_groups,
    read_preferences,
    read_scored_pairs,
)
from research.data.trec import ranking, write_run
from research.errors import DataFormatError, ResearchError
from research.losses import ListwiseSoftmaxCE
from research.retrieval.rerank import candidate_run
from research.zelo import Vote, write_votes

DOC_IDS = [f"d{i}" for i in range(1, 31)]
TOPICS = ["cancer gene tumor", "heart blood risk", "brain mice study", "virus immune infection", "bone growth drug"]
QUERY_TEXT = {f"q{i}": TOPICS[i % len(TOPICS)] + f" question {i}" for i in range(1, 9)}
QRELS = {"train": {"q1": {"d1": 1, "d2": 1}, "q2": {"d3": 1, "d4": 0}, "q3": {"d5": 2}, "q4": {"d6": 1}},
         "test": {"q5": {"d7": 1}, "q6": {"d8": 1, "d9": 1}, "q7": {"d10": 1}}}


def write_beir(root: Path) -> Path:
    (root / "qrels").mkdir(parents=True)
    with open(root / "corpus.jsonl", "w") as f:
        for i, doc_id in enumerate(DOC_IDS):
            f.write(json.dumps({"_id": doc_id, "title": f"title {i}", "text": f"{TOPICS[i % 5]} text {'long ' * i}"}) + "\n")
    with open(root / "queries.jsonl", "w") as f:
        for query_id, text in QUERY_TEXT.items():
            f.write(json.dumps({"_id": query_id, "text": text}) + "\n")
    for split, qrels in QRELS.items():
        rows = [f"{q}\t{d}\t{g}" for q, docs in qrels.items() for d, g in docs.items()]
        (root / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(rows) + "\n")
    return root


@pytest.fixture
def beir(tmp_path) -> Path:
    return write_beir(tmp_path / "tiny")


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def first_batch(module) -> PairGroupBatch:
    module.setup("fit")
    return next(iter(module.train_dataloader()))


EVAL = dict(eval_candidates="bm25", eval_top_k=5, eval_batch_size=4)


# ---------------------------------------------------------------- listwise
def test_listwise_batches_are_padded_and_masked(beir, tmp_path):
    groups = write_jsonl(tmp_path / "groups.jsonl", [
        {"query_id": "q1", "doc_ids": ["d11", "d1", "d12"], "labels": [0, 2, 1], "scores": [0.5, 3.0, 1.0]},
        {"query_id": "q2", "doc_ids": ["d3", "d13"], "labels": [1, 0], "scores": [2.0, -1.0]},
        {"query_id": "q3", "doc_ids": ["d14", "d15", "d16", "d5", "d17", "d18"], "labels": [0, 0, 0, 1, 0, 0],
         "scores": [1.0, 2.0, 0.0, 4.0, 0.5, 0.1]},
    ])
    module = ListwiseDataModule(str(beir), str(groups), group_size=4, batch_size=3, seed=1, **EVAL)
    batch = first_batch(module)
    assert isinstance(batch, PairGroupBatch) and len(batch) == 3
    assert batch.targets.shape == batch.mask.shape == (3, 4) and batch.mask.dtype == torch.bool
    for row, qid in enumerate(batch.query_ids):
        n = len(batch.doc_ids[row])
        assert batch.mask[row].tolist() == [True] * n + [False] * (4 - n)
        assert len(batch.documents[row]) == n and batch.queries[row] == QUERY_TEXT[qid]
        assert batch.targets[row, 0] == batch.targets[row, :n].max()  # the best document leads its group
        assert (batch.targets[row, n:] == 0).all()
    rows = dict(zip(batch.query_ids, range(3)))
    assert batch.doc_ids[rows["q1"]] == ["d1", "d11", "d12"] and batch.targets[rows["q1"], :3].tolist() == [2, 0, 1]
    assert batch.doc_ids[rows["q3"]][0] == "d5" and len(batch.doc_ids[rows["q3"]]) == 4
    teacher = ListwiseDataModule(str(beir), str(groups), target_field="scores", batch_size=3, **EVAL)
    batch = first_batch(teacher)
    rows = dict(zip(batch.query_ids, range(3)))
    assert batch.targets.shape == (3, 6) and batch.targets[rows["q2"], :2].tolist() == [2.0, -1.0]


# ---------------------------------------------------------------- pairwise
def test_pairwise_batches_hold_preferences_from_zelo_votes(beir, tmp_path):
    votes = [Vote("q1", "d1", "d11", 0.8), Vote("q2", "d13", "d3", 0.25, {"judge": 0.25}), Vote("q5", "d7", "d8", 1.0)]
    write_votes(tmp_path / "votes.jsonl", votes)
    module = PairwiseDataModule(str(beir), str(tmp_path / "votes.jsonl"), batch_size=3, **EVAL)
    batch = first_batch(module)
    assert batch.targets.shape == batch.mask.shape == (3, 2) and batch.mask.all()
    by_query = {q: (docs, t.tolist()) for q, docs, t in zip(batch.query_ids, batch.doc_ids, batch.targets)}
    assert by_query["q2"] == (["d13", "d3"], [0.25, 0.75])
    assert by_query["q1"][0] == ["d1", "d11"] and by_query["q1"][1] == pytest.approx([0.8, 0.2])


def test_softmax_ce_over_a_preference_pair_is_soft_ranknet():
    scores, p = torch.tensor([[1.3, -0.4], [0.2, 0.9]]), torch.tensor([0.8, 0.25])
    targets = torch.stack([p, 1 - p], dim=1)
    diff = scores[:, 0] - scores[:, 1]
    sigmoid = 1 / (1 + torch.exp(-diff))
    reference = -(p * torch.log(sigmoid) + (1 - p) * torch.log(1 - sigmoid)).mean()
    torch.testing.assert_close(ListwiseSoftmaxCE()(scores, targets), reference)


# ---------------------------------------------------------------- pointwise
def test_pointwise_batches_are_single_documents(beir, tmp_path):
    scores = write_jsonl(tmp_path / "scores.jsonl", [
        {"query_id": "q1", "doc_id": "d1", "score": 1}, {"query_id": "q1", "doc_id": "d2", "score": 0.5},
        {"query_id": "q3", "doc_id": "d9", "score": -2.5}, {"query_id": "q4", "doc_id": "d6", "score": 0},
    ])
    module = PointwiseDataModule(str(beir), str(scores), batch_size=4, **EVAL)
    batch = first_batch(module)
    assert batch.targets.shape == batch.mask.shape == (4, 1)
    got = {(q, docs[0]): float(t) for q, docs, t in zip(batch.query_ids, batch.doc_ids, batch.targets[:, 0])}
    assert got == {("q1", "d1"): 1.0, ("q1", "d2"): 0.5, ("q3", "d9"): -2.5, ("q4", "d6"): 0.0}


# ---------------------------------------------------------------- candidate groups
def _fake_run() -> dict:
    """Every train query ranks all 30 documents: its own positives at ranks 1-2, the rest in a fixed order."""
    run = {}
    for qid, docs in QRELS["train"].items():
        order = sorted(docs, key=lambda d: -docs[d]) + [d for d in DOC_IDS if d not in docs]
        run[qid] = {d: 100.0 - r for r, d in enumerate(order)}
    return run


def test_candidate_groups_draw_negatives_from_the_rank_window(beir, tmp_path):
    write_run(tmp_path / "train.trec", _fake_run())
    module = CandidateGroupsDataModule(str(beir), train_candidates=str(tmp_path / "train.trec"), group_size=5,
                                       negative_rank_min=3, negative_rank_max=12, batch_size=2, **EVAL)
    module.setup("fit")
    dataset = module._train_set
    positives = {q: {d for d, g in docs.items() if g >= 1} for q, docs in QRELS["train"].items()}
    assert len(dataset) == sum(len(p) for p in positives.values()) == 5
    run = _fake_run()
    for epoch in range(3):
        for index in range(len(dataset)):
            item = dataset[(epoch, index)]
            window = {d for d, _ in ranking(run[item.query_id], 12)[2:]}
            assert item.doc_ids[0] in positives[item.query_id] and item.targets == (1.0, 0.0, 0.0, 0.0, 0.0)
            assert set(item.doc_ids[1:]) <= window - positives[item.query_id]
            assert len(set(item.doc_ids)) == 5
    assert dataset[(0, 0)] == dataset[(0, 0)] and any(dataset[(0, i)] != dataset[(1, i)] for i in range(5))
    batch = next(iter(module.train_dataloader()))
    assert batch.targets.shape == batch.mask.shape == (2, 5) and batch.mask.all()
    assert batch.targets[:, 0].tolist() == [1.0, 1.0] and batch.targets[:, 1:].sum() == 0


def test_candidate_groups_never_take_a_labelled_positive_and_top_up(beir, tmp_path):
    # q2's judged-non-relevant d4 may be a negative; q1's positives d1, d2 never are, even inside the window
    run = {"q1": {"d2": 3.0, "d1": 2.0, "d20": 1.0}, "q2": {"d4": 5.0}}
    write_run(tmp_path / "short.trec", run)
    module = CandidateGroupsDataModule(str(beir), train_candidates=str(tmp_path / "short.trec"), group_size=4,
                                       negative_rank_min=1, negative_rank_max=3, batch_size=1, **EVAL)
    module.setup("fit")
    for epoch in range(5):
        for index in range(len(module._train_set)):
            item = module._train_set[(epoch, index)]
            negatives = item.doc_ids[1:]
            assert len(negatives) == 3 and not set(negatives) & {d for d, g in QRELS["train"][item.query_id].items() if g}
            if item.query_id == "q1":
                assert "d20" in negatives
            if item.query_id == "q2":
                assert "d4" in negatives


def test_candidate_groups_from_bm25(beir):
    module = CandidateGroupsDataModule(str(beir), group_size=3, negative_rank_min=1, negative_rank_max=10,
                                       batch_size=2, **EVAL)
    batch = first_batch(module)
    assert batch.targets.shape == (2, 3) and batch.mask.all()


def test_bad_candidate_run_documents_are_reported(beir, tmp_path):
    write_run(tmp_path / "bad.trec", {"q1": {"nope": 1.0}})
    module = CandidateGroupsDataModule(str(beir), train_candidates=str(tmp_path / "bad.trec"), **EVAL)
    with pytest.raises(ResearchError, match="nope"):
        module.setup("fit")
    with pytest.raises(ResearchError, match="neither 'bm25' nor a run file"):
        CandidateGroupsDataModule(str(beir), train_candidates="missing.trec", **EVAL).setup("fit")


# ---------------------------------------------------------------- evaluation side
def test_eval_batches_are_the_top_k_pairs_of_each_judged_query(beir):
    module = RerankingDataModule(str(beir), train_split=None, **EVAL)
    module.setup("test")
    batches = list(module.test_dataloader())
    assert all(isinstance(b, PairBatch) and 1 <= len(b) <= 4 for b in batches)
    assert all(len(b.query_ids) == len(b.doc_ids) == len(b.queries) == len(b.documents) for b in batches)
    pairs = [(q, d) for b in batches for q, d in zip(b.query_ids, b.doc_ids)]
    data = load_dataset(beir, "test")
    bm25 = candidate_run("bm25", data, 5, list(data.judged_queries))
    expected = [(p.query_id, p.doc_id) for p in candidate_pairs(data, bm25, 5, list(data.judged_queries))]
    assert sorted(pairs) == sorted(expected) and len(pairs) == 15
    assert {q for q, _ in pairs} == {"q5", "q6", "q7"}
    lengths = [len(q) + len(d) for b in batches for q, d in zip(b.queries, b.documents)]
    assert lengths == sorted(lengths, reverse=True)
    with pytest.raises(ResearchError, match="no training data"):
        module.setup("fit")


def test_eval_candidates_from_a_run_file(beir, tmp_path):
    write_run(tmp_path / "cands.trec", {"q5": {"d7": 2.0, "d1": 3.0, "d2": 1.0}, "q6": {"d8": 1.0}, "q8": {"d1": 1.0}})
    module = RerankingDataModule(str(beir), train_split=None, eval_candidates=str(tmp_path / "cands.trec"), eval_top_k=2)
    module.setup("test")
    pairs = {(b_q, b_d) for b in module.test_dataloader() for b_q, b_d in zip(b.query_ids, b.doc_ids)}
    assert pairs == {("q5", "d1"), ("q5", "d7"), ("q6", "d8")}  # top 2, judged queries only


# ---------------------------------------------------------------- malformed files
LISTWISE_ERRORS = [
    ('{"query_id": "q1", "doc_ids": ["d1"], "labels": [1]}\n{"doc_ids": ["d1"], "labels": [1]}', 2, "query_id"),
    ('{"query_id": "qx", "doc_ids": ["d1"], "labels": [1]}', 1, "query_id"),
    ('{"query_id": "q1", "doc_ids": ["d1", "dx"], "labels": [1, 0]}', 1, "doc_ids"),
    ('{"query_id": "q1", "doc_ids": [], "labels": []}', 1, "doc_ids"),
    ('{"query_id": "q1", "doc_ids": ["d1", "d1"], "labels": [1, 0]}', 1, "doc_ids"),
    ('{"query_id": "q1", "doc_ids": "d1", "labels": [1]}', 1, "doc_ids"),
    ('{"query_id": "q1", "doc_ids": ["d1", "d2"], "labels": [1]}', 1, "labels"),
    ('{"query_id": "q1", "doc_ids": ["d1"], "labels": ["high"]}', 1, "labels"),
    ('{"query_id": "q1", "doc_ids": ["d1"]}', 1, "labels"),
    ('\n{"query_id": "q1", "doc_ids": ["d1"], "labels": [1]}\n{"query_id": "q1", "doc_ids": ["d1"], "labels": [NaN]}', 3, "labels"),
    ('{"query_id": "q1", "doc_ids": ["d1"], "labels": [1]}\n{not json', 2, None),
]
PAIRWISE_ERRORS = [
    ('{"query_id": "q1", "doc_a": "d1", "doc_b": "d2", "p": 0.5}\n{"query_id": "q1", "doc_a": "d1", "doc_b": "d2", "p": 1.5}', 2, "p"),
    ('{"query_id": "q1", "doc_a": "d1", "doc_b": "d1", "p": 0.5}', 1, "doc_b"),
    ('{"query_id": "q1", "doc_a": "d1", "p": 0.5}', 1, "doc_b"),
    ('{"query_id": "q1", "doc_a": "d1", "doc_b": "d2", "p": 0.5}\n\n{"query_id": "qx", "doc_a": "d1", "doc_b": "d2", "p": 0.5}', 3, "query_id"),
    ('{"query_id": "q1", "doc_a": "dx", "doc_b": "d2", "p": 0.5}', 1, "doc_a"),
    ('{"query_id": "q1", "doc_a": "d1", "doc_b": "d2"}', 1, "p"),
]
POINTWISE_ERRORS = [
    ('{"query_id": "q1", "doc_id": "d1", "score": 1}\n{"query_id": "q1", "doc_id": "d1", "score": 0}', 2, "doc_id"),
    ('{"query_id": "q1", "doc_id": "dx", "score": 1}', 1, "doc_id"),
    ('{"query_id": 7, "doc_id": "d1", "score": 1}', 1, "query_id"),
    ('{"query_id": "q1", "doc_id": "d1"}', 1, "score"),
    ('{"query_id": "q1", "doc_id": "d1", "score": true}', 1, "score"),
    ('{"query_id": "q1", "doc_id": "d1", "score": Infinity}', 1, "score"),
    ('[1, 2]', 1, None),
]


@pytest.mark.parametrize(("reader", "text", "line", "field"), [
    *[(read_listwise_groups, *case) for case in LISTWISE_ERRORS],
    *[(read_preferences, *case) for case in PAIRWISE_ERRORS],
    *[(read_scored_pairs, *case) for case in POINTWISE_ERRORS],
])
def test_bad_records_name_file_line_and_field(beir, tmp_path, reader, text, line, field):
    path = tmp_path / "bad.jsonl"
    path.write_text(text + "\n")
    data = load_dataset(beir, "train")
    with pytest.raises(DataFormatError) as err:
        reader(path, data)
    assert (err.value.path, err.value.line, err.value.field) == (str(path), line, field)


def test_empty_files_and_bad_records_surface_through_the_datamodule(beir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataFormatError, match="no scored pairs"):
        PointwiseDataModule(str(beir), str(empty), **EVAL).setup("fit")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"query_id": "q1", "doc_ids": ["d1"], "labels": [math.pi]}, "{oops"])
    with pytest.raises(DataFormatError) as err:
        ListwiseDataModule(str(beir), str(bad), **EVAL).setup("fit")
    assert err.value.line == 2
