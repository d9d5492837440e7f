"""RetrievalDataModule: training groups, hard negatives, the epoch sampler, batches and the evaluation encoding order."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import write_jsonl

from datamodules.retrieval import (
    EncodeDataset,
    EpochShuffleSampler,
    LengthBucketSampler,
    RetrievalDataModule,
)
from research.data.batches import EncodeBatch, GroupBatch
from research.data.beir import load_dataset
from research.data.groups import groups_from_qrels, read_groups
from research.errors import DataFormatError, ResearchError


def _module(data_dir, **kwargs) -> RetrievalDataModule:
    module = RetrievalDataModule(str(data_dir), **kwargs)
    module.setup("fit")
    return module


def test_groups_from_qrels_one_item_per_query_positive(tiny_beir_dir):
    module = _module(tiny_beir_dir, num_negatives=0, seed=0)
    train = module.train_data
    expected = sorted((q, d) for q, docs in train.qrels.items() for d, grade in docs.items() if grade >= 1)
    assert len(expected) == 48  # 24 train queries x 2 relevant documents
    assert sorted(module._train_set.items) == expected
    assert len(module._train_set) == 48
    assert "train_unjudged" not in module._train_set.groups
    graded = {"a": {"x": 2, "y": 1, "z": 0}, "b": {"x": 0}, "c": {"w": 1}}
    assert {q: g.positives for q, g in groups_from_qrels(graded).items()} == {"a": ["x", "y"], "c": ["w"]}
    assert {q: g.positives for q, g in groups_from_qrels(graded, relevance_level=2).items()} == {"a": ["x"]}


def _copy_with_groups(tiny_beir_dir, tmp_path, records):
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_beir_dir, data_dir)
    write_jsonl(tmp_path / "groups.jsonl", records)
    return data_dir, tmp_path / "groups.jsonl"


def test_hard_negatives_file_is_read_and_excludes_positives(tiny_beir_dir, tmp_path):
    train = load_dataset(tiny_beir_dir, "train")
    qid = "train_q_space_0"
    positives = sorted(train.qrels[qid])
    others = [d for d in train.corpus if d.startswith("d_space") and d not in positives]
    records = [
        # no positives given: the qrels positives; one listed negative is a qrels positive and must go
        {"query_id": qid, "negatives": [others[0], positives[1], others[1]],
         "negative_scores": [0.5, 0.9, 0.1]},
        # explicit positives (one of the two qrels positives): the other qrels positive is no negative either
        {"query_id": "train_q_food_0", "positives": [sorted(train.qrels["train_q_food_0"])[0]],
         "negatives": [sorted(train.qrels["train_q_food_0"])[1], "d_food_5", "d_music_0"]},
    ]
    data_dir, groups_file = _copy_with_groups(tiny_beir_dir, tmp_path, records)
    module = _module(data_dir, groups_file=str(groups_file), num_negatives=2, seed=3)
    groups = module._train_set.groups
    assert groups[qid].positives == list(train.qrels[qid])
    assert groups[qid].negatives == [others[0], others[1]]
    assert groups[qid].scores == {others[0]: 0.5, positives[1]: 0.9, others[1]: 0.1}
    food = sorted(train.qrels["train_q_food_0"])
    assert groups["train_q_food_0"].positives == [food[0]]
    assert food[1] not in groups["train_q_food_0"].negatives
    assert set(groups["train_q_food_0"].negatives) <= {"d_food_5", "d_music_0"} - set(food)
    # every qrels positive is masked in-batch, even one the groups file does not list
    dataset = module._train_set
    index = next(i for i, (q, _) in enumerate(dataset.items) if q == "train_q_food_0")
    assert dataset.collate([dataset[(0, index)]]).positive_ids == [frozenset(food)]
    # items draw exactly the mined negatives when there are num_negatives of them
    for index, (item_qid, positive) in enumerate(dataset.items):
        if item_qid == qid:
            got_qid, docs = dataset[(0, index)]
            assert got_qid == qid and docs[0] == positive and sorted(docs[1:]) == sorted([others[0], others[1]])


def test_negatives_topped_up_with_random_documents_never_positives(tiny_beir_dir, tmp_path):
    train = load_dataset(tiny_beir_dir, "train")
    qid = "train_q_music_1"
    mined = [d for d in train.corpus if d.startswith("d_sport")][:2]
    data_dir, groups_file = _copy_with_groups(tiny_beir_dir, tmp_path, [{"query_id": qid, "negatives": mined}])
    module = _module(data_dir, groups_file=str(groups_file), num_negatives=6, seed=0)
    dataset = module._train_set
    seen_random = set()
    for epoch in range(3):
        for index, (item_qid, positive) in enumerate(dataset.items):
            got_qid, docs = dataset[(epoch, index)]
            assert got_qid == item_qid and docs[0] == positive and len(docs) == 7
            negatives = docs[1:]
            assert len(set(negatives)) == 6
            assert not set(negatives) & set(train.qrels[item_qid])
            assert set(negatives) <= set(train.corpus)
            if item_qid == qid:
                assert set(mined) <= set(negatives)
                seen_random.update(set(negatives) - set(mined))
            assert dataset[(epoch, index)] == (got_qid, docs)  # deterministic in (seed, epoch, index)
    assert len(seen_random) > 4  # the top-up is random, not a fixed pick
    # fewer negatives than mined: a subset of the mined ones
    module = _module(data_dir, groups_file=str(groups_file), num_negatives=1, seed=0)
    index = next(i for i, (q, _) in enumerate(module._train_set.items) if q == qid)
    assert module._train_set[(0, index)][1][1] in mined
    # more negatives than the corpus can give: a clear error, not an endless top-up
    with pytest.raises(ResearchError, match="num_negatives=35"):
        _module(data_dir, num_negatives=35)
    assert len(_module(data_dir, num_negatives=34)._train_set[(0, 0)][1]) == 35


def test_groups_file_errors_name_the_line(tiny_beir_dir, tmp_path):
    data = load_dataset(tiny_beir_dir, "train")
    write_jsonl(tmp_path / "g.jsonl", [{"query_id": "train_q_space_0", "negatives": ["d_food_1"]},
                                       {"query_id": "train_q_space_1", "negatives": ["nope"]}])
    with pytest.raises(DataFormatError) as info:
        read_groups(tmp_path / "g.jsonl", data.queries, data.corpus)
    assert (info.value.line, info.value.field) == (2, "negatives") and "unknown document 'nope'" in str(info.value)
    write_jsonl(tmp_path / "g.jsonl", [{"query_id": "train_q_space_0", "negatives": ["d_food_1"], "negative_scores": [1, 2]}])
    with pytest.raises(DataFormatError, match=r"g\.jsonl:1: field 'negative_scores'"):
        read_groups(tmp_path / "g.jsonl", data.queries, data.corpus)


# ------------------------------------------------------------------ sampler
def test_epoch_sampler_deterministic_and_different_across_epochs():
    def order(epoch, seed=7, **kw):
        sampler = EpochShuffleSampler(50, seed=seed, **kw)
        sampler.set_epoch(epoch)
        return list(sampler)

    first = order(0)
    assert first == order(0)
    assert all(epoch == 0 for epoch, _ in first)
    assert sorted(i for _, i in first) == list(range(50))
    assert [i for _, i in first] != list(range(50))
    assert [i for _, i in order(1)] != [i for _, i in first]
    assert all(epoch == 1 for epoch, _ in order(1))
    assert [i for _, i in order(0, seed=8)] != [i for _, i in first]
    assert [i for _, i in order(0, shuffle=False)] == list(range(50))


@pytest.mark.parametrize("size", [50, 51])
def test_epoch_sampler_shards_disjointly_across_two_ranks(size):
    shards = []
    for rank in range(2):
        sampler = EpochShuffleSampler(size, seed=1, rank=rank, world_size=2)
        sampler.set_epoch(4)
        shards.append([i for _, i in sampler])
        assert len(shards[-1]) == len(sampler) == size // 2
    assert not set(shards[0]) & set(shards[1])
    single = EpochShuffleSampler(size, seed=1)
    single.set_epoch(4)
    whole = [i for _, i in single]
    assert shards[0] + shards[1] == whole[: 2 * (size // 2)]  # the same global order, split between ranks


def _bucketed(lengths, batch_size, epoch, **kw):
    sampler = LengthBucketSampler(lengths, batch_size, seed=3, **kw)
    sampler.set_epoch(epoch)
    items = list(sampler)
    assert all(e == epoch for e, _ in items)
    return [i for _, i in items]


@pytest.mark.parametrize("size", [100, 103])
def test_length_bucket_sampler_is_a_shuffled_permutation_of_sorted_windows(size):
    lengths = [(i * 37) % 91 for i in range(size)]
    batch, per_bucket = 4, 5
    order = _bucketed(lengths, batch, 0, batches_per_bucket=per_bucket)
    assert sorted(order) == list(range(size))
    assert order == _bucketed(lengths, batch, 0, batches_per_bucket=per_bucket)
    assert order != _bucketed(lengths, batch, 1, batches_per_bucket=per_bucket)
    # windows as the plain shuffle cuts them; every full batch is a run of one window sorted by length
    shuffled = EpochShuffleSampler(size, seed=3)
    plain = [i for _, i in shuffled]
    windows = [plain[s:s + batch * per_bucket] for s in range(0, size, batch * per_bucket)]
    runs = {tuple(sorted(w, key=lambda i: lengths[i], reverse=True)[s:s + batch])
            for w in windows for s in range(0, len(w), batch)}
    batches = [tuple(order[s:s + batch]) for s in range(0, size, batch)]
    assert set(batches) == runs
    if size % batch:  # the one incomplete batch comes last, so that drop_last drops it
        assert len(batches[-1]) == size % batch and all(len(b) == batch for b in batches[:-1])
    # less padding: the sum over batches of the longest item, against the plain shuffle's
    padded = lambda o: sum(max(lengths[i] for i in o[s:s + batch]) for s in range(0, size - size % batch, batch))  # noqa: E731
    assert padded(order) < 0.8 * padded(plain)
    assert batches != sorted(batches, key=lambda b: -lengths[b[0]])  # batches shuffled, not longest first


def test_length_bucket_sampler_shards_disjointly_and_rejects_bad_sizes():
    lengths = list(range(40))
    shards = [LengthBucketSampler(lengths, 4, seed=0, rank=r, world_size=2) for r in range(2)]
    items = [{i for _, i in s} for s in shards]
    assert len(items[0]) == len(items[1]) == 20 and not items[0] & items[1]
    with pytest.raises(ValueError, match="batch_size"):
        LengthBucketSampler(lengths, 0, seed=0)


def test_datamodule_length_bucketing_batches_similar_lengths(tiny_beir_dir):
    plain = _module(tiny_beir_dir, batch_size=4, seed=0)
    bucketed = _module(tiny_beir_dir, batch_size=4, seed=0, length_bucketing=True, batches_per_bucket=12)
    assert isinstance(bucketed.train_dataloader().sampler, LengthBucketSampler)
    lengths = bucketed._train_set.lengths()
    assert lengths[0] == len(bucketed.train_data.queries[bucketed._train_set.items[0][0]]) + len(
        bucketed.train_data.corpus[bucketed._train_set.items[0][1]].full_text)

    def spread(module):
        batches = list(module.train_dataloader())
        assert len(batches) == 48 // 4
        sizes = [[len(q) + len(docs[0]) for q, docs in zip(b.queries, b.documents)] for b in batches]
        return sum(max(s) - min(s) for s in sizes)

    assert spread(bucketed) < spread(plain)


# ------------------------------------------------------------------ batches
def test_group_batch_shapes(tiny_beir_dir):
    module = _module(tiny_beir_dir, num_negatives=3, batch_size=5, seed=0)
    loader = module.train_dataloader()
    batches = list(loader)
    assert len(batches) == 48 // 5  # drop_last
    batch = batches[0]
    assert isinstance(batch, GroupBatch)
    assert len(batch) == 5 and batch.group_size == 4
    assert batch.targets.shape == (5, 4) and batch.targets.dtype == torch.float32
    assert torch.equal(batch.targets, torch.tensor([[1.0, 0, 0, 0]] * 5))
    assert batch.teacher_scores is None
    corpus, queries, qrels = module.train_data.corpus, module.train_data.queries, module.train_data.qrels
    for qid, query, ids, docs, positives in zip(batch.query_ids, batch.queries, batch.doc_ids, batch.documents,
                                                batch.positive_ids):
        assert query == queries[qid]
        assert docs == [corpus[d].full_text for d in ids]
        assert positives == frozenset(qrels[qid]) and ids[0] in positives
    # the loader draws the same batches for the same epoch, other ones for the next
    again = list(module.train_dataloader())
    assert [b.doc_ids for b in again] == [b.doc_ids for b in batches]
    loader.sampler.set_epoch(1)
    assert [b.query_ids for b in loader] != [b.query_ids for b in batches]


def _one_scored_negative_per_query(tiny_beir_dir, tmp_path):
    """A copy of the tiny dataset with a groups file: each train query's positives (teacher 5.0), one negative (-1.5)."""
    train = load_dataset(tiny_beir_dir, "train")
    records = []
    for qid, docs in train.qrels.items():
        negative = next(d for d in train.corpus if d not in docs)
        records.append({"query_id": qid, "positives": list(docs), "positive_scores": [5.0] * len(docs),
                        "negatives": [negative], "negative_scores": [-1.5]})
    return _copy_with_groups(tiny_beir_dir, tmp_path, records)


def test_teacher_scores_in_batch_when_every_document_is_scored(tiny_beir_dir, tmp_path):
    data_dir, groups_file = _one_scored_negative_per_query(tiny_beir_dir, tmp_path)
    module = _module(data_dir, groups_file=str(groups_file), num_negatives=1, batch_size=4)
    batch = next(iter(module.train_dataloader()))
    assert torch.equal(batch.teacher_scores, torch.tensor([[5.0, -1.5]] * 4))


def test_encode_dataset_judged_queries_then_all_documents_by_length(tiny_beir_dir):
    data = load_dataset(tiny_beir_dir, "test")
    dataset = EncodeDataset(data, batch_size=5)
    batches = [dataset[i] for i in range(len(dataset))]
    assert all(isinstance(b, EncodeBatch) for b in batches)
    query_batches = [b for b in batches if b.is_query]
    doc_batches = [b for b in batches if not b.is_query]
    assert batches[: len(query_batches)] == query_batches  # queries first
    query_ids = [i for b in query_batches for i in b.ids]
    assert query_ids == list(data.judged_queries) and "test_unjudged" not in query_ids
    assert [t for b in query_batches for t in b.texts] == [data.queries[q] for q in query_ids]
    doc_ids = [i for b in doc_batches for i in b.ids]
    assert sorted(doc_ids) == sorted(data.corpus)
    lengths = [len(t) for b in doc_batches for t in b.texts]
    assert lengths == sorted(lengths, reverse=True)
    assert [t for b in doc_batches for t in b.texts] == [data.corpus[d].full_text for d in doc_ids]
    assert [len(b) for b in query_batches] == [5, 5, 2] and [len(b) for b in doc_batches] == [5] * 7 + [1]
    module = RetrievalDataModule(str(tiny_beir_dir), train_split=None, eval_split="test", eval_batch_size=5)
    module.setup("test")
    assert module.train_data is None
    assert [b.ids for b in module.test_dataloader()] == [b.ids for b in batches]
    # a module that encodes the corpus itself (the bi-encoder: shard by shard) gets the query batches only, and
    # the evaluation splits read the corpus through the offset index: no dict, no batch of every text
    from modules.bi_encoder import BiEncoderModule
    from research.data.offsets import OffsetCorpus

    assert isinstance(module.eval_data.corpus, OffsetCorpus)
    module.trainer = type("AttachedTrainer", (), {"lightning_module": BiEncoderModule.__new__(BiEncoderModule)})()
    assert [b.ids for b in module.test_dataloader()] == [b.ids for b in query_batches]


def test_unscored_top_up_negatives_are_nan_and_masked_in_distillation(tiny_beir_dir, tiny_model_dir, tmp_path):
    """A mined group shorter than num_negatives is topped up with random documents the teacher never scored: NaN
    teacher scores, which the bi-encoder masks out of MarginMSE (no in-batch negatives)."""
    from modules.bi_encoder import BiEncoderModule
    from research.losses import MarginMSE

    data_dir, groups_file = _one_scored_negative_per_query(tiny_beir_dir, tmp_path)
    module = _module(data_dir, groups_file=str(groups_file), num_negatives=2, batch_size=4)
    batch = next(iter(module.train_dataloader()))
    teacher = batch.teacher_scores
    assert torch.equal(teacher[:, :2], torch.tensor([[5.0, -1.5]] * 4)) and torch.isnan(teacher[:, 2]).all()

    bi = BiEncoderModule(model=str(tiny_model_dir), loss=MarginMSE(), distill=True, in_batch_negatives=False)
    queries, documents = torch.randn(4, 8), torch.randn(4 * 3, 8)
    scores, targets, mask, _ = bi._score(batch, queries, documents)
    assert torch.equal(mask, torch.tensor([[True, True, False]] * 4)) and torch.isfinite(targets).all()
    loss = MarginMSE()(scores, targets, mask)
    expected = (((scores[:, 0] - scores[:, 1]) - (5.0 + 1.5)) ** 2).mean()  # one scored negative per row
    assert torch.allclose(loss, expected)
    bi.hparams.in_batch_negatives = True
    with pytest.raises(ValueError, match="in_batch_negatives: false"):
        bi._score(batch, queries, documents)
