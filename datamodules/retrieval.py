"""DataModule for dense-retrieval training on (query, positive, negatives...) groups and evaluation on a BEIR split."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from datamodules.loader import ResumableDataLoader
from research.data.batches import EncodeBatch, GroupBatch
from research.data.beir import RetrievalDataset, load_dataset
from research.data.groups import TrainingGroup, groups_from_qrels, read_groups
from research.data.trec import Qrels
from research.errors import ResearchError
from research.eval.metrics import QUERIES_WITHOUT_RELEVANT
from research.seeds import stable_seed


class EpochShuffleSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)``: a seeded shuffle per epoch, sharded across ranks, resumable.

    The epoch travels with each index so that the dataset draws its per-item randomness (negatives)
    from ``(seed, epoch, index)``: the same batches come out after a restart or on another rank count.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.seed, self.shuffle, self.rank, self.world_size = size, seed, shuffle, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = list(range(self.size))
        if self.shuffle:
            random.Random(stable_seed(self.seed, self.epoch)).shuffle(order)
        per_rank = len(order) // self.world_size
        order = order[self.rank * per_rank:(self.rank + 1) * per_rank] if self.world_size > 1 else order
        return iter([(self.epoch, i) for i in order])

    def __len__(self) -> int:
        return self.size // self.world_size


class LengthBucketSampler(EpochShuffleSampler):
    """:class:`EpochShuffleSampler` whose consecutive ``batch_size`` items have similar lengths (less padding).

    Each rank's shuffled order is cut into windows of ``batch_size * batches_per_bucket`` items; each window is sorted
    by ``lengths`` and cut into batches; the full batches of the epoch are shuffled (seeded by epoch) and a last
    incomplete one stays last, so that ``drop_last`` drops it. A function of ``(seed, epoch)`` like its parent, so
    resuming and other rank counts see the same batches. With in-batch negatives this changes which documents share
    a batch (similar lengths), which is why it is an option.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, batches_per_bucket: int = 50,
                 rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1 or batches_per_bucket < 1:
            raise ValueError(f"batch_size and batches_per_bucket must be >= 1, got {batch_size}, {batches_per_bucket}")
        super().__init__(len(lengths), seed, True, rank, world_size)
        self.lengths, self.batch_size, self.batches_per_bucket = lengths, batch_size, batches_per_bucket

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = [index for _, index in super().__iter__()]
        window = self.batch_size * self.batches_per_bucket
        batches = []
        for start in range(0, len(order), window):
            bucket = sorted(order[start:start + window], key=lambda i: self.lengths[i], reverse=True)
            batches += [bucket[s:s + self.batch_size] for s in range(0, len(bucket), self.batch_size)]
        last = [batches.pop()] if batches and len(batches[-1]) < self.batch_size else []
        random.Random(stable_seed(self.seed, self.epoch, "buckets")).shuffle(batches)
        return iter([(self.epoch, i) for batch in batches + last for i in batch])


class GroupDataset(Dataset):
    """One item per (query, positive) pair, with ``num_negatives`` negatives drawn per epoch."""

    def __init__(self, data: RetrievalDataset, groups: dict[str, TrainingGroup], num_negatives: int, seed: int,
                 relevant: dict[str, set[str]] | None = None) -> None:
        self.data, self.groups, self.num_negatives, self.seed = data, groups, num_negatives, seed
        self.items = [(qid, pos) for qid, group in groups.items() for pos in group.positives]
        # every document known relevant (the group's positives and the qrels'): never a negative, masked in-batch
        relevant = relevant or {}
        self.positive_sets = {qid: frozenset(group.positives) | frozenset(relevant.get(qid, ())) for qid, group in groups.items()}
        self._doc_ids = list(data.corpus)
        available = len(self._doc_ids) - max((len(s) for s in self.positive_sets.values()), default=0)
        if num_negatives > available:  # the random top-up below could never finish
            raise ResearchError(f"num_negatives={num_negatives} but the corpus has only {available} non-relevant documents for some query")

    def __len__(self) -> int:
        return len(self.items)

    def lengths(self) -> list[int]:
        """Characters of each item's query and positive (the length that length bucketing sorts by)."""
        corpus, queries = self.data.corpus, self.data.queries
        return [len(queries[qid]) + len(corpus[pos].full_text) for qid, pos in self.items]

    def __getitem__(self, key: tuple[int, int]) -> tuple[str, list[str]]:
        epoch, index = key
        query_id, positive = self.items[index]
        rng = random.Random(stable_seed(self.seed, epoch, index))
        group = self.groups[query_id]
        negatives = list(group.negatives)
        if len(negatives) > self.num_negatives:
            negatives = rng.sample(negatives, self.num_negatives)
        while len(negatives) < self.num_negatives:  # too few mined: fill with random corpus documents
            candidate = self._doc_ids[rng.randrange(len(self._doc_ids))]
            if candidate not in self.positive_sets[query_id] and candidate not in negatives:
                negatives.append(candidate)
        return query_id, [positive, *negatives]

    def collate(self, items: list[tuple[str, list[str]]]) -> GroupBatch:
        corpus, queries = self.data.corpus, self.data.queries
        doc_ids = [docs for _, docs in items]
        targets = torch.zeros(len(items), len(doc_ids[0]))
        targets[:, 0] = 1.0
        teacher = None
        scored = [self.groups[qid].scores or {} for qid, _ in items]
        if any(scored):  # NaN marks a document the teacher never scored (e.g. a random top-up negative)
            teacher = torch.tensor([[s.get(d, math.nan) for d in docs] for s, docs in zip(scored, doc_ids)])
        return GroupBatch(
            query_ids=[qid for qid, _ in items],
            queries=[queries[qid] for qid, _ in items],
            doc_ids=doc_ids,
            documents=[[corpus[d].full_text for d in docs] for docs in doc_ids],
            targets=targets,
            positive_ids=[self.positive_sets[qid] for qid, _ in items],
            teacher_scores=teacher,
        )


class EncodeDataset(Dataset):
    """The judged queries of the evaluation split, then (``with_corpus``) the corpus sorted by length (little
    padding). Without the corpus the batches hold queries only: memory no longer grows with the corpus."""

    def __init__(self, data: RetrievalDataset, batch_size: int, with_corpus: bool = True) -> None:
        queries = list(data.judged_queries.items())
        docs = sorted(((d, doc.full_text) for d, doc in data.corpus.items()), key=lambda x: len(x[1]),
                      reverse=True) if with_corpus else []
        self.batches = [
            EncodeBatch([i for i, _ in chunk], [t for _, t in chunk], is_query)
            for items, is_query in ((queries, True), (docs, False))
            for chunk in (items[s:s + batch_size] for s in range(0, len(items), batch_size))
        ]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> EncodeBatch:
        return self.batches[index]


@dataclass(frozen=True)
class EvaluationTarget:
    """What a LightningModule scores its validation/test runs against, handed over by the DataModules'
    ``evaluation_target(stage)``: the val or eval split's qrels, the lowest grade that counts as relevant, and
    whether queries without a relevant document count (``exclude``, the default, or ``trec_eval``)."""

    qrels: Qrels
    relevance_level: int
    queries_without_relevant: str = "exclude"


def check_queries_without_relevant(value: str) -> None:
    """A DataModule's ``queries_without_relevant``, checked when it is built, not after a test epoch."""
    if value not in QUERIES_WITHOUT_RELEVANT:
        raise ResearchError(f"queries_without_relevant={value!r}: choose from {', '.join(QUERIES_WITHOUT_RELEVANT)}")


def check_val_split(val: RetrievalDataset, others: dict[str, RetrievalDataset | None]) -> None:
    """Validation chooses epochs and checkpoints, so it shares no query with the eval (test) or the train split."""
    for role, other in others.items():
        if other is None:
            continue
        if other.split == val.split:
            raise ResearchError(f"val_split '{val.split}' is also the {role} split: validate on a split of its own "
                                "(research dev-split carves one from train)")
        shared = sorted(set(val.qrels) & set(other.qrels))
        if shared:
            raise ResearchError(f"{val.path}: val split '{val.split}' and {role} split '{other.split}' share "
                                f"{len(shared)} queries (e.g. '{shared[0]}'): validation would choose on "
                                f"{role} queries")


class RetrievalDataModule(L.LightningDataModule):
    """Trains on groups built from BEIR qrels (plus an optional groups JSONL of hard negatives); evaluates on a split.

    Args:
        data: dataset folder, or a name under ``$RESEARCH_DATA_DIR``.
        train_split: qrels split to train on (``None``: evaluation only).
        eval_split: qrels split that ``test`` evaluates on.
        val_split: qrels split that validation (during ``fit``, and ``validate``) evaluates on, e.g. the ``dev`` of
            ``research dev-split``; ``None``: no validation. It may share no query with ``eval_split`` or
            ``train_split``, so a monitored metric (early stopping, checkpoint choice) never sees a test query.
        groups_file: JSONL of mined groups (see :mod:`research.data.groups`); its negatives become hard negatives.
        num_negatives: hard negatives per query (topped up with random documents when a group has fewer).
        length_bucketing: batch items of similar length (query + positive, in characters) together, from windows of
            ``batches_per_bucket`` batches (:class:`LengthBucketSampler`); less padding, but in-batch negatives of
            similar length. Off: a plain seeded shuffle.
        relevance_level: the lowest qrels grade that is a positive (training) and relevant (metrics).
        queries_without_relevant: ``exclude`` (default) or ``trec_eval``: whether validation/test average over the
            queries with no relevant document too, as trec_eval does (``research.eval.metrics``).
    """

    def __init__(
        self,
        data: str,
        train_split: str | None = "train",
        eval_split: str | None = "test",
        groups_file: str | None = None,
        num_negatives: int = 0,
        batch_size: int = 32,
        eval_batch_size: int = 128,
        relevance_level: int = 1,
        queries_without_relevant: str = "exclude",
        seed: int = 0,
        num_workers: int = 0,
        length_bucketing: bool = False,
        batches_per_bucket: int = 50,
        val_split: str | None = None,
    ) -> None:
        super().__init__()
        check_queries_without_relevant(queries_without_relevant)
        self.save_hyperparameters()
        self.train_data: RetrievalDataset | None = None
        self.eval_data: RetrievalDataset | None = None
        self.val_data: RetrievalDataset | None = None
        self._train_set: GroupDataset | None = None

    def setup(self, stage: str) -> None:
        hp = self.hparams
        if stage == "fit" and hp.train_split and self._train_set is None:
            self.train_data = load_dataset(hp.data, hp.train_split)
            groups = groups_from_qrels(self.train_data.qrels, hp.relevance_level)
            relevant = {qid: set(group.positives) for qid, group in groups.items()}
            if hp.groups_file:
                mined = read_groups(Path(hp.groups_file), self.train_data.queries, self.train_data.corpus)
                for qid, group in mined.items():
                    base = groups.get(qid)
                    positives = group.positives or (base.positives if base else [])
                    if positives:
                        known = set(positives) | relevant.get(qid, set())
                        negatives = [n for n in group.negatives if n not in known]
                        groups[qid] = TrainingGroup(qid, positives, negatives, group.scores)
            self._train_set = GroupDataset(self.train_data, groups, hp.num_negatives, hp.seed, relevant)
        # evaluation reads the corpus through its byte-offset index: no dict of every text on any rank
        if hp.eval_split and self.eval_data is None:
            self.eval_data = load_dataset(hp.data, hp.eval_split, lazy_corpus=True)
        if hp.val_split and self.val_data is None and stage in ("fit", "validate"):
            self.val_data = load_dataset(hp.data, hp.val_split, lazy_corpus=True)
        if self.val_data is not None:
            check_val_split(self.val_data, {"eval": self.eval_data, "train": self.train_data})

    def train_dataloader(self) -> DataLoader:
        assert self._train_set is not None, "setup('fit') has not run, or train_split is None"
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        hp = self.hparams
        if hp.length_bucketing:
            sampler = LengthBucketSampler(self._train_set.lengths(), hp.batch_size, hp.seed, hp.batches_per_bucket, rank, world)
        else:
            sampler = EpochShuffleSampler(len(self._train_set), hp.seed, True, rank, world)
        return ResumableDataLoader(  # its position within the epoch survives a checkpoint (datamodules.loader)
            self._train_set, batch_size=hp.batch_size, sampler=sampler, drop_last=True,
            collate_fn=self._train_set.collate, num_workers=hp.num_workers,
        )

    def test_dataloader(self) -> DataLoader:
        assert self.eval_data is not None, "eval_split is None"
        return DataLoader(EncodeDataset(self.eval_data, self.hparams.eval_batch_size, self._corpus_in_batches()),
                          batch_size=None)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_data is None:  # no val_split: nothing to validate on (Lightning skips an empty list)
            return []
        return DataLoader(EncodeDataset(self.val_data, self.hparams.eval_batch_size, self._corpus_in_batches()),
                          batch_size=None)

    def _corpus_in_batches(self) -> bool:
        """Whether the attached module needs the corpus as evaluation batches (``corpus_in_eval_batches``)."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        return bool(getattr(module, "corpus_in_eval_batches", True))

    def evaluation_target(self, stage: str = "test") -> EvaluationTarget:
        """The qrels and relevance level that the module's ``val`` / ``test`` runs are scored against."""
        data = self.val_data if stage == "val" else self.eval_data
        assert data is not None, f"no {'val' if stage == 'val' else 'eval'}_split"
        return EvaluationTarget(data.qrels, self.hparams.relevance_level, self.hparams.queries_without_relevant)
