"""Hard-negative mining, teacher scoring and run-to-groups against brute-force references, on tiny random models."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_tiny_beir, tiny_bert, tiny_tokenizer, write_jsonl

from research.cli.main import main
from research.data.beir import load_dataset
from research.data.groups import read_groups
from research.retrieval.dense import DenseIndex
from research.retrieval.mining import mine, mine_batch
from research.retrieval.negatives import FILTERS, MiningConfig, MiningStats, positives_and_excluded
from research.retrieval.run_groups import run_to_groups

THREE = "train_q_space_0"  # given three positives below


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from helpers import TINY_BERT, VOCAB
    from transformers import BertConfig, BertForSequenceClassification

    from research.models.bi_encoder import BiEncoder, BiEncoderConfig
    from research.models.cross_encoder import CrossEncoder, CrossEncoderConfig

    root = tmp_path_factory.mktemp("mining")
    beir = make_tiny_beir(root / "beir")
    qrels = beir / "qrels" / "train.tsv"
    rows = [line.split("\t") for line in qrels.read_text().splitlines()[1:]]
    labelled = {r[1] for r in rows if r[0] == THREE}
    extra = next(f"d_space_{i}" for i in range(6) if f"d_space_{i}" not in labelled)
    judged_zero = next(f"d_food_{i}" for i in range(6))
    with open(qrels, "a") as handle:
        handle.write(f"{THREE}\t{extra}\t1\n{THREE}\t{judged_zero}\t0\n")
    bi_dir = root / "bi"
    tokenizer = tiny_tokenizer(bi_dir)
    BiEncoder(tiny_bert(0, with_pooler=False), tokenizer,
              BiEncoderConfig(query_max_length=32, document_max_length=64)).save_pretrained(bi_dir)
    ce_dir = root / "ce"
    torch.manual_seed(1)
    ce = CrossEncoder(BertForSequenceClassification(BertConfig(vocab_size=len(VOCAB), num_labels=1, **TINY_BERT)).eval(),
                      tiny_tokenizer(ce_dir), CrossEncoderConfig(max_length=64, query_max_length=16))
    ce.save_pretrained(ce_dir)
    encoder = BiEncoder.from_pretrained(bi_dir).eval()
    data = load_dataset(beir, "train")
    doc_ids = list(data.corpus)
    docs = encoder.encode_texts([data.corpus[d].full_text for d in doc_ids], is_query=False).numpy()
    positives, excluded = positives_and_excluded(data.qrels)
    qids = [q for q in data.queries if q in positives]
    queries = encoder.encode_texts([data.queries[q] for q in qids], is_query=True).numpy()
    return dict(root=root, beir=beir, bi=bi_dir, ce=ce_dir, data=data, doc_ids=doc_ids, docs=docs, qids=qids,
                queries=queries, positives=positives, excluded=excluded, extra=extra, judged_zero=judged_zero)


def reference(w, config: MiningConfig, teacher=None):
    """Brute force over the full query x corpus matrix (numpy, float64): negatives per query and removal counts."""
    scores = w["queries"].astype(np.float64) @ w["docs"].astype(np.float64).T
    removed = dict.fromkeys(FILTERS, 0)
    out = {}
    for qi, qid in enumerate(w["qids"]):
        row = scores[qi]
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))[:config.depth]
        min_pos = min(row[w["doc_ids"].index(d)] for d in w["positives"][qid])
        kept = []
        for rank, j in enumerate(order, start=1):
            d, s = w["doc_ids"][j], row[j]
            if d in w["excluded"][qid]:
                removed["positive"] += 1
            elif not config.rank_min <= rank <= config.last_rank:
                removed["rank_window"] += 1
            elif config.margin is not None and not s < min_pos - config.margin:
                removed["margin"] += 1
            elif config.relative_margin is not None and not s < min_pos * (1 - config.relative_margin):
                removed["relative_margin"] += 1
            elif config.max_score is not None and not s <= config.max_score:
                removed["max_score"] += 1
            elif config.max_rescore_score is not None and not teacher(qid, d) <= config.max_rescore_score:
                removed["rescorer"] += 1
            else:
                kept.append(d)
        if config.num_negatives is not None and len(kept) > config.num_negatives:
            removed["num_negatives"] += len(kept) - config.num_negatives
            kept = kept[:config.num_negatives]
        out[qid] = kept
    return out, removed


def mine_all(w, config, batch=1000, rescorer=None, out=None):
    index = DenseIndex(w["docs"], w["doc_ids"])
    batches = [(w["qids"][s:s + batch], w["queries"][s:s + batch]) for s in range(0, len(w["qids"]), batch)]
    return mine(index, batches, w["positives"], w["excluded"], config, out=out, rescorer=rescorer)


def read_out(path):
    return {r["query_id"]: r for r in map(json.loads, Path(path).read_text().splitlines())}


def thresholds(w):
    scores = w["queries"].astype(np.float64) @ w["docs"].astype(np.float64).T
    gaps = [min(scores[i, w["doc_ids"].index(d)] for d in w["positives"][q]) - scores[i] for i, q in enumerate(w["qids"])]
    return float(np.quantile(np.concatenate(gaps), 0.4)), float(np.quantile(scores, 0.6))


def test_mined_negatives_never_include_a_labelled_positive(world, tmp_path, capsys):
    out = tmp_path / "groups.jsonl"
    assert main(["mine", "--model", str(world["bi"]), "--data", str(world["beir"]), "--split", "train",
                 "--out", str(out), "--depth", "36", "--device", "cpu"]) == 0
    assert "removed by positive" in capsys.readouterr().out
    records = read_out(out)
    assert set(records) == set(world["qids"])
    for qid, record in records.items():
        labelled = {d for d, g in world["data"].qrels[qid].items() if g > 0}
        assert not labelled & set(record["negatives"])
        assert len(record["negatives"]) == 36 - len(labelled)  # everything else, positives excluded however many
    three = records[THREE]
    assert len(three["positives"]) == 3 and world["extra"] in three["positives"]
    assert world["judged_zero"] in three["negatives"]  # judged non-relevant: a fine negative
    assert three["negative_ranks"] == sorted(three["negative_ranks"])
    assert not out.with_name(out.name + ".progress").exists()


@pytest.mark.parametrize("name", ["window", "margin", "relative", "max_score", "cap", "all"])
def test_each_filter_removes_exactly_what_brute_force_says(world, name):
    margin, max_score = thresholds(world)
    config = {
        "window": MiningConfig(depth=20, rank_min=4, rank_max=15),
        "margin": MiningConfig(depth=30, margin=margin),
        "relative": MiningConfig(depth=30, relative_margin=0.002),
        "max_score": MiningConfig(depth=30, max_score=max_score),
        "cap": MiningConfig(depth=30, num_negatives=3),
        "all": MiningConfig(depth=30, rank_min=3, rank_max=28, margin=margin / 4, relative_margin=0.0005,
                            max_score=max_score, num_negatives=5),
    }[name]
    expected, removed = reference(world, config)
    records = {}
    index = DenseIndex(world["docs"], world["doc_ids"])
    recs, stats = mine_batch(index, world["qids"], world["queries"], world["positives"], world["excluded"], config)
    records = {r["query_id"]: r["negatives"] for r in recs}
    assert records == expected
    assert stats.removed == removed
    assert stats.candidates == len(world["qids"]) * config.depth
    assert stats.kept == sum(map(len, expected.values()))
    assert 0 < stats.kept < stats.candidates - removed["positive"]  # the filter did something, not everything


def test_query_batching_gives_identical_output(world, tmp_path):
    margin, max_score = thresholds(world)
    config = MiningConfig(depth=25, rank_min=2, margin=margin / 2, num_negatives=6)
    outputs = []
    for batch in (1, 5, len(world["qids"])):
        mine_all(world, config, batch=batch, out=tmp_path / f"b{batch}.jsonl")
        outputs.append((tmp_path / f"b{batch}.jsonl").read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]
    # the command (queries encoded per batch): the same negatives
    a, b = tmp_path / "cli1.jsonl", tmp_path / "cli_all.jsonl"
    for out, batch in ((a, "1"), (b, "1000")):
        assert main(["mine", "--model", str(world["bi"]), "--data", str(world["beir"]), "--out", str(out), "--depth", "25",
                     "--rank-window", "2:25", "--margin", str(margin / 2), "--num-negatives", "6",
                     "--query-batch", batch, "--device", "cpu"]) == 0
    ra, rb = read_out(a), read_out(b)
    assert {q: r["negatives"] for q, r in ra.items()} == {q: r["negatives"] for q, r in rb.items()}


def test_output_reads_back_and_trains_with_teacher_scores(world, tmp_path):
    from datamodules.retrieval import RetrievalDataModule

    out = tmp_path / "groups.jsonl"
    assert main(["mine", "--model", str(world["bi"]), "--data", str(world["beir"]), "--out", str(out), "--depth", "20",
                 "--rank-window", "2:20", "--rescorer", str(world["ce"]), "--device", "cpu"]) == 0
    data = world["data"]
    groups = read_groups(out, data.queries, data.corpus)
    assert set(groups) == set(world["qids"])
    for record in read_out(out).values():
        assert len(record["positive_scores"]) == len(record["positives"])
        assert len(record["negative_scores"]) == len(record["negatives"])
    dm = RetrievalDataModule(str(world["beir"]), train_split="train", eval_split=None, groups_file=str(out),
                             num_negatives=3, batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.teacher_scores is not None and batch.teacher_scores.shape == (4, 4)


def test_rescorer_filter_and_teacher_scores_match_pair_by_pair(world, tmp_path, capsys):
    from research.models.scorers import load_scorer

    ce = load_scorer(world["ce"])
    data = world["data"]

    @functools.cache
    def one(qid, doc_id):
        return float(ce.score_pairs([data.queries[qid]], [data.corpus[doc_id].full_text])[0])

    # a threshold in the middle of the teacher scores of the candidates
    sample = [one(q, d) for q in world["qids"][:4] for d in world["doc_ids"][:8]]
    threshold = float(np.median(sample))
    config = MiningConfig(depth=8, rank_min=2, max_rescore_score=threshold)
    expected, removed = reference(world, config, teacher=one)
    out = tmp_path / "groups.jsonl"
    assert main(["mine", "--model", str(world["bi"]), "--data", str(world["beir"]), "--out", str(out), "--depth", "8",
                 "--rank-window", "2:8", "--rescorer", str(world["ce"]), "--max-rescore-score", str(threshold),
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert f"removed by rescorer {removed['rescorer']:>10}" in printed.replace("rescorer        ", "rescorer")
    records = read_out(out)
    assert {q: r["negatives"] for q, r in records.items()} == expected
    assert removed["rescorer"] > 0
    for qid, r in records.items():
        for d, s in zip(r["positives"] + r["negatives"], r["positive_scores"] + r["negative_scores"]):
            assert s == pytest.approx(one(qid, d), abs=1e-5)


def test_score_command_equals_scoring_pair_by_pair(world, tmp_path):
    from research.models.scorers import load_scorer

    data = world["data"]
    groups = tmp_path / "in.jsonl"
    write_jsonl(groups, [{"query_id": q, "positives": world["positives"][q], "negatives": world["doc_ids"][:3], "x": 1}
                         for q in world["qids"][:5]])
    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(pairs, [{"query_id": q, "doc_id": d} for q in world["qids"][:3] for d in world["doc_ids"][5:9]])
    for model in ("ce", "bi"):  # any scoring model: a cross-encoder, a bi-encoder
        scorer = load_scorer(world[model])

        @functools.cache
        def one(qid, doc_id):
            return float(scorer.score_pairs([data.queries[qid]], [data.corpus[doc_id].full_text])[0])

        out = tmp_path / f"groups-{model}.jsonl"
        assert main(["score", "--model", str(world[model]), "--pairs", str(groups), "--data", str(world["beir"]),
                     "--out", str(out), "--batch-size", "3", "--device", "cpu"]) == 0
        scored = read_groups(out, data.queries, data.corpus)
        for record in map(json.loads, out.read_text().splitlines()):
            assert record["x"] == 1  # other fields kept
            for d in record["positives"] + record["negatives"]:
                assert scored[record["query_id"]].scores[d] == pytest.approx(one(record["query_id"], d), abs=1e-5)
        out = tmp_path / f"pairs-{model}.jsonl"
        assert main(["score", "--model", str(world[model]), "--pairs", str(pairs), "--data", str(world["beir"]),
                     "--out", str(out), "--device", "cpu"]) == 0
        for record in map(json.loads, out.read_text().splitlines()):
            assert record["score"] == pytest.approx(one(record["query_id"], record["doc_id"]), abs=1e-5)


def test_score_rejects_unknown_ids(world, tmp_path, capsys):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"query_id": world["qids"][0], "doc_id": "nope"}])
    assert main(["score", "--model", str(world["ce"]), "--pairs", str(pairs), "--data", str(world["beir"]),
                 "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "pairs.jsonl:1: field 'doc_id' unknown document 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_run_to_groups_on_a_hand_made_run(world, tmp_path):
    data = world["data"]
    q = THREE
    labelled = [d for d, g in data.qrels[q].items() if g > 0]
    others = [d for d in world["doc_ids"] if d not in data.qrels[q]]
    # ranks: 1 other0, 2 positive, 3 other1, 4 judged-zero, 5 other2, 6 positive, 7 other3
    ranked = [others[0], labelled[0], others[1], world["judged_zero"], others[2], labelled[1], others[3]]
    run_file = tmp_path / "run.trec"
    run_file.write_text("".join(f"{q} Q0 {d} {i + 1} {10 - i} hand\n" for i, d in enumerate(ranked))
                        + f"unknown_query Q0 {others[0]} 1 1.0 hand\n")
    out = tmp_path / "groups.jsonl"
    assert main(["run-to-groups", "--run", str(run_file), "--data", str(world["beir"]), "--split", "train",
                 "--out", str(out), "--rank-window", "2:6"]) == 0
    records = read_out(out)
    assert list(records) == [q]  # other judged queries have no row in the run
    assert records[q]["negatives"] == [others[1], world["judged_zero"], others[2]]
    assert records[q]["negative_ranks"] == [3, 4, 5]
    assert sorted(records[q]["positives"]) == sorted(labelled)
    read_groups(out, data.queries, data.corpus)
    records, stats, missing = run_to_groups({q: {d: 10.0 - i for i, d in enumerate(ranked)}}, data.qrels,
                                            MiningConfig(depth=10**9, num_negatives=2))
    assert records[0]["negatives"] == [others[0], others[1]]
    assert stats.removed["positive"] == 2 and stats.removed["num_negatives"] == 3
    assert missing == len(world["qids"]) - 1


def test_interrupted_mining_resumes_from_its_progress(world, tmp_path):
    config = MiningConfig(depth=20, rank_min=2, num_negatives=4)
    index = DenseIndex(world["docs"], world["doc_ids"])
    calls = []

    def batches(fail_at=None):
        for n, s in enumerate(range(0, len(world["qids"]), 4)):
            if n == fail_at:
                raise KeyboardInterrupt
            yield world["qids"][s:s + 4], (lambda s=s: calls.append(s) or world["queries"][s:s + 4])

    out, progress = tmp_path / "groups.jsonl", tmp_path / "groups.jsonl.progress"
    with pytest.raises(KeyboardInterrupt):
        mine(index, batches(fail_at=3), world["positives"], world["excluded"], config, out=out, progress_dir=progress)
    assert not out.exists() and len(list(progress.glob("batch-*.jsonl"))) == 3
    calls.clear()
    stats = mine(index, batches(), world["positives"], world["excluded"], config, out=out, progress_dir=progress)
    assert 0 not in calls and 12 in calls  # the three finished batches were not mined again
    fresh = tmp_path / "fresh.jsonl"
    fresh_stats = mine(index, batches(), world["positives"], world["excluded"], config, out=fresh)
    assert out.read_bytes() == fresh.read_bytes() and stats == fresh_stats
    assert not progress.exists()
    assert isinstance(stats, MiningStats)


@pytest.mark.parametrize("loss", ["MarginMSE", "KLDistillation"])
def test_mined_teacher_groups_distill_into_the_bi_encoder(world, tmp_path, loss):
    """mine -> teacher scores (cross-encoder) -> BiEncoderModule(distill=True, no in-batch negatives) trains."""
    import lightning as L

    import research.losses as losses
    from datamodules.retrieval import RetrievalDataModule
    from modules.bi_encoder import BiEncoderModule

    out = tmp_path / "groups.jsonl"
    assert main(["mine", "--model", str(world["bi"]), "--data", str(world["beir"]), "--out", str(out), "--depth", "12",
                 "--rank-window", "2:12", "--rescorer", str(world["ce"]), "--device", "cpu"]) == 0
    module = BiEncoderModule(model=str(world["bi"]), loss=getattr(losses, loss)(), distill=True, in_batch_negatives=False)
    dm = RetrievalDataModule(str(world["beir"]), train_split="train", eval_split=None, groups_file=str(out),
                             num_negatives=3, batch_size=4)
    before = [p.detach().clone() for p in module.encoder.parameters()]
    L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False, limit_val_batches=0,
              num_sanity_val_steps=0,
              enable_progress_bar=False, enable_model_summary=False).fit(module, datamodule=dm)
    assert any(not torch.equal(a, b) for a, b in zip(before, module.encoder.parameters()))
