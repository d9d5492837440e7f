"""DataModules for re-rankers: listwise, pairwise and pointwise training data, and re-ranking evaluation.

Training (each DataModule one source; the JSONL schemas are in :mod:`research.data.formats`):

- :class:`ListwiseDataModule`: groups ``(query, documents, labels or teacher scores)``; batch ``[Q, G]``, G the
  largest group in the batch (at most ``group_size``), shorter groups masked.
- :class:`PairwiseDataModule`: preferences ``(query, doc_a, doc_b, p)``; batch ``[Q, 2]`` with targets
  ``[p, 1 - p]``, so that :class:`~research.losses.ListwiseSoftmaxCE` over the pair is RankNet's cross-entropy with
  the soft label ``p``.
- :class:`PointwiseDataModule`: scored pairs ``(query, document, score)``; batch ``[Q, 1]``.
- :class:`CandidateGroupsDataModule`: from BEIR qrels and a candidate run (BM25 on the fly, or a TREC run file):
  one group per (query, positive), the positive first (target 1) and ``group_size - 1`` negatives (target 0) drawn
  each epoch from the candidate ranks ``negative_rank_min..negative_rank_max`` (1-based, inclusive), never a
  labelled positive; batch ``[Q, group_size]``.

Evaluation (all of them): the eval split's judged queries, each with its top ``eval_top_k`` candidates from BM25
(``eval_candidates: bm25``) or a TREC run file; batches of (query, document) pairs, sorted by length.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.loader import ResumableDataLoader
from datamodules.retrieval import EpochShuffleSampler, EvaluationTarget, check_queries_without_relevant, check_val_split
from research.data.batches import PairBatch, PairGroupBatch
from research.data.beir import RetrievalDataset, load_dataset
from research.data.candidates import CandidatePair, candidate_pairs, ranked_candidates
from research.data.formats import (
    read_listwise_groups,
    read_preferences,
    read_scored_pairs,
)
from research.data.groups import qrels_positives
from research.data.trec import Run
from research.errors import DataFormatError, ResearchError
from research.io import iter_jsonl
from research.retrieval.rerank import BM25, candidate_run
from research.seeds import stable_seed


@dataclass(frozen=True)
class TrainingList:
    """One training item: a query, its documents and their targets."""

    query_id: str
    doc_ids: tuple[str, ...]
    targets: tuple[float, ...]


def collate_lists(data: RetrievalDataset, items: list[TrainingList]) -> PairGroupBatch:
    """Pad items into a :class:`PairGroupBatch`."""
    width = max(len(item.doc_ids) for item in items)
    targets = torch.zeros(len(items), width)
    mask = torch.zeros(len(items), width, dtype=torch.bool)
    for row, item in enumerate(items):
        targets[row, :len(item.targets)] = torch.tensor(item.targets)
        mask[row, :len(item.doc_ids)] = True
    return PairGroupBatch(
        query_ids=[item.query_id for item in items],
        queries=[data.queries[item.query_id] for item in items],
        doc_ids=[list(item.doc_ids) for item in items],
        documents=[[data.corpus[d].full_text for d in item.doc_ids] for item in items],
        targets=targets,
        mask=mask,
    )


class TrainingListDataset(Dataset):
    """Items indexed by ``(epoch, index)`` (see :class:`EpochShuffleSampler`); subclasses implement ``item``."""

    def __init__(self, data: RetrievalDataset, size: int, seed: int) -> None:
        self.data, self.size, self.seed = data, size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: tuple[int, int]) -> TrainingList:
        epoch, index = key
        return self.item(index, random.Random(stable_seed(self.seed, epoch, index)))

    def item(self, index: int, rng: random.Random) -> TrainingList:
        raise NotImplementedError

    def collate(self, items: list[TrainingList]) -> PairGroupBatch:
        return collate_lists(self.data, items)


class ListwiseGroupDataset(TrainingListDataset):
    """One item per group: its highest-target document first, then up to ``group_size - 1`` others (file order)."""

    def __init__(self, data: RetrievalDataset, groups_file: str | Path, target_field: str, group_size: int | None,
                 seed: int) -> None:
        self.groups = read_listwise_groups(groups_file, data, target_field)
        super().__init__(data, len(self.groups), seed)
        self.group_size = group_size

    def item(self, index: int, rng: random.Random) -> TrainingList:
        group = self.groups[index]
        best = max(range(len(group.doc_ids)), key=lambda i: group.targets[i])
        others = [i for i in range(len(group.doc_ids)) if i != best]
        if self.group_size is not None and len(others) > self.group_size - 1:
            others = sorted(rng.sample(others, self.group_size - 1))
        keep = [best, *others]
        return TrainingList(group.query_id, tuple(group.doc_ids[i] for i in keep), tuple(group.targets[i] for i in keep))


class PreferenceDataset(TrainingListDataset):
    """One item per preference: ``(doc_a, doc_b)`` with targets ``(p, 1 - p)``."""

    def __init__(self, data: RetrievalDataset, preferences_file: str | Path, seed: int) -> None:
        self.votes = read_preferences(preferences_file, data)
        super().__init__(data, len(self.votes), seed)

    def item(self, index: int, rng: random.Random) -> TrainingList:
        vote = self.votes[index]
        return TrainingList(vote.query_id, (vote.doc_a, vote.doc_b), (vote.p, 1.0 - vote.p))


class ScoredPairDataset(TrainingListDataset):
    """One item per scored pair: a group of one document."""

    def __init__(self, data: RetrievalDataset, scores_file: str | Path, seed: int) -> None:
        self.pairs = read_scored_pairs(scores_file, data)
        super().__init__(data, len(self.pairs), seed)

    def item(self, index: int, rng: random.Random) -> TrainingList:
        pair = self.pairs[index]
        return TrainingList(pair.query_id, (pair.doc_id,), (pair.score,))


class CandidateGroupDataset(TrainingListDataset):
    """One item per (query, positive): the positive, then negatives drawn from a rank window of the candidate run.

    Too few candidates in the window (a short or missing ranking) are topped up with random corpus documents;
    no labelled positive of the query is ever a negative.
    """

    def __init__(self, data: RetrievalDataset, candidates: Run, group_size: int, negative_rank_min: int,
                 negative_rank_max: int, relevance_level: int, seed: int) -> None:
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2 (a positive and a negative), got {group_size}")
        if not 1 <= negative_rank_min <= negative_rank_max:
            raise ValueError(f"need 1 <= negative_rank_min <= negative_rank_max, got {negative_rank_min}..{negative_rank_max}")
        self.positives = {qid: frozenset(docs) for qid, docs in qrels_positives(data.qrels, relevance_level).items()}
        self.items = [(qid, doc) for qid, docs in self.positives.items() for doc in sorted(docs)]
        if not self.items:
            raise ResearchError(f"{data.path}: no query of split '{data.split}' has a document with relevance >= {relevance_level}")
        super().__init__(data, len(self.items), seed)
        self.group_size = group_size
        self.windows: dict[str, list[str]] = {}
        for qid in data.qrels:  # every judged query's candidates are checked, with or without a positive
            ranked = ranked_candidates(data, candidates, qid, negative_rank_max)
            self.windows[qid] = [d for d in ranked[negative_rank_min - 1:] if d not in self.positives.get(qid, ())]
        self._doc_ids = list(data.corpus)
        if len(self._doc_ids) <= max(len(p) for p in self.positives.values()) + group_size - 1:
            raise ResearchError(f"{data.path}: corpus too small for groups of {group_size}")

    def item(self, index: int, rng: random.Random) -> TrainingList:
        query_id, positive = self.items[index]
        window, positives = self.windows[query_id], self.positives[query_id]
        wanted = self.group_size - 1
        negatives = rng.sample(window, wanted) if len(window) > wanted else list(window)
        while len(negatives) < wanted:
            candidate = self._doc_ids[rng.randrange(len(self._doc_ids))]
            if candidate not in positives and candidate not in negatives:
                negatives.append(candidate)
        return TrainingList(query_id, (positive, *negatives), (1.0, *([0.0] * wanted)))


class PairEvalDataset(Dataset):
    """Evaluation pairs in batches, longest texts first (little padding)."""

    def __init__(self, data: RetrievalDataset, pairs: list[CandidatePair], batch_size: int) -> None:
        def length(pair: CandidatePair) -> int:
            return len(data.queries[pair.query_id]) + len(data.corpus[pair.doc_id].full_text)

        ordered = sorted(pairs, key=length, reverse=True)
        self.batches = [
            PairBatch(
                query_ids=[p.query_id for p in chunk],
                doc_ids=[p.doc_id for p in chunk],
                queries=[data.queries[p.query_id] for p in chunk],
                documents=[data.corpus[p.doc_id].full_text for p in chunk],
            )
            for chunk in (ordered[s:s + batch_size] for s in range(0, len(ordered), batch_size))
        ]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> PairBatch:
        return self.batches[index]


class RerankingDataModule(L.LightningDataModule):
    """Re-ranking evaluation on a BEIR split; subclasses add a training source (``build_train_set``).

    Args:
        data: dataset folder, or a name under ``$RESEARCH_DATA_DIR``.
        train_split: qrels split loaded for training (``None``: corpus and queries only).
        eval_split: qrels split that ``test`` re-ranks and scores (``None``: no evaluation).
        eval_candidates: ``bm25`` (computed on the fly) or a TREC run file of first-stage candidates.
        eval_top_k: candidates re-ranked per query (validation too).
        batch_size: training items (queries) per batch; eval_batch_size: pairs per evaluation batch.
        val_split: qrels split that validation (during ``fit``, and ``validate``) re-ranks and scores, e.g. the
            ``dev`` of ``research dev-split``; ``None``: no validation. It may share no query with ``eval_split`` or
            ``train_split`` (:func:`~datamodules.retrieval.check_val_split`).
        val_candidates: the validation candidates (default: ``eval_candidates`` when that is ``bm25``; a run file
            for the eval split holds no val query, so name one for the val split).
        relevance_level, queries_without_relevant: how validation and test are scored (``research.eval.metrics``):
            the lowest relevant grade, and ``exclude`` (default) or ``trec_eval`` for queries with no relevant document.
    """

    def __init__(
        self,
        data: str,
        train_split: str | None = "train",
        eval_split: str | None = "test",
        eval_candidates: str = BM25,
        eval_top_k: int = 100,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        relevance_level: int = 1,
        queries_without_relevant: str = "exclude",
        seed: int = 0,
        num_workers: int = 0,
        val_split: str | None = None,
        val_candidates: str | None = None,
    ) -> None:
        super().__init__()
        check_queries_without_relevant(queries_without_relevant)
        self.save_hyperparameters()
        self.train_data: RetrievalDataset | None = None
        self.eval_data: RetrievalDataset | None = None
        self.eval_pairs: list[CandidatePair] = []
        self.val_data: RetrievalDataset | None = None
        self.val_pairs: list[CandidatePair] = []
        self._train_set: TrainingListDataset | None = None
        if val_split and val_candidates is None and eval_candidates != BM25:
            raise ResearchError(f"val_split '{val_split}' needs val_candidates: eval_candidates {eval_candidates!r} "
                                "ranks the eval split's queries")

    def build_train_set(self, data: RetrievalDataset) -> TrainingListDataset:
        raise ResearchError(f"{type(self).__name__} has no training data: use a DataModule with a training source")

    def setup(self, stage: str) -> None:
        hp = self.hparams
        if stage == "fit" and self._train_set is None:
            self.train_data = load_dataset(hp.data, hp.train_split)
            self._train_set = self.build_train_set(self.train_data)
        if hp.eval_split and self.eval_data is None:
            self.eval_data = load_dataset(hp.data, hp.eval_split)
            query_ids = list(self.eval_data.judged_queries)
            run = candidate_run(hp.eval_candidates, self.eval_data, hp.eval_top_k, query_ids)
            self.eval_pairs = candidate_pairs(self.eval_data, run, hp.eval_top_k, query_ids)
        if hp.val_split and self.val_data is None and stage in ("fit", "validate"):
            self.val_data = load_dataset(hp.data, hp.val_split)
            query_ids = list(self.val_data.judged_queries)
            run = candidate_run(hp.val_candidates or hp.eval_candidates, self.val_data, hp.eval_top_k, query_ids)
            self.val_pairs = candidate_pairs(self.val_data, run, hp.eval_top_k, query_ids)
        if self.val_data is not None:
            check_val_split(self.val_data, {"eval": self.eval_data, "train": self.train_data})

    def train_dataloader(self) -> DataLoader:
        assert self._train_set is not None, "setup('fit') has not run"
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = EpochShuffleSampler(len(self._train_set), self.hparams.seed, True, rank, world)
        return ResumableDataLoader(self._train_set, batch_size=self.hparams.batch_size, sampler=sampler, drop_last=True,
                                   collate_fn=self._train_set.collate, num_workers=self.hparams.num_workers)

    def test_dataloader(self) -> DataLoader:
        assert self.eval_data is not None, "eval_split is None"
        return DataLoader(PairEvalDataset(self.eval_data, self.eval_pairs, self.hparams.eval_batch_size), batch_size=None)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_data is None:  # no val_split: nothing to validate on (Lightning skips an empty list)
            return []
        return DataLoader(PairEvalDataset(self.val_data, self.val_pairs, self.hparams.eval_batch_size), batch_size=None)

    def evaluation_target(self, stage: str = "test") -> EvaluationTarget:
        """The qrels and relevance level that the module's ``val`` / ``test`` re-rankings are scored against."""
        data = self.val_data if stage == "val" else self.eval_data
        assert data is not None, f"no {'val' if stage == 'val' else 'eval'}_split"
        return EvaluationTarget(data.qrels, self.hparams.relevance_level, self.hparams.queries_without_relevant)


class ListwiseDataModule(RerankingDataModule):
    """Trains on listwise groups from ``groups_file``; ``target_field`` names the labels or teacher scores to fit.

    ``group_size`` caps each group (its best document plus a per-epoch random sample of the others).
    A group whose query is judged in the eval or the val split's qrels is refused (training on the queries it is
    evaluated or selected on) unless ``allow_eval_queries`` says so explicitly.
    """

    def __init__(self, data: str, groups_file: str, target_field: str = "labels", group_size: int | None = None,
                 train_split: str | None = None, allow_eval_queries: bool = False, **kwargs) -> None:
        super().__init__(data, train_split=train_split, **kwargs)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        held_out = [(d, role) for d, role in ((self.eval_data, "evaluation"), (self.val_data, "validation"))
                    if d is not None]
        if stage == "fit" and held_out and not self.hparams.allow_eval_queries:
            path = Path(self.hparams.groups_file)
            for line, record in iter_jsonl(path):  # the reader has validated every record already
                for data, role in held_out:
                    if record["query_id"] in data.qrels:
                        raise DataFormatError(path, line, "query_id", f"query '{record['query_id']}' is judged in the "
                                              f"{role} split '{data.split}': training on it leaks the queries it is "
                                              f"{'tested' if role == 'evaluation' else 'selected'} on (set "
                                              "allow_eval_queries: true to do it anyway)")

    def build_train_set(self, data: RetrievalDataset) -> TrainingListDataset:
        hp = self.hparams
        return ListwiseGroupDataset(data, hp.groups_file, hp.target_field, hp.group_size, hp.seed)


class PairwiseDataModule(RerankingDataModule):
    """Trains on pairwise preferences (zELO votes JSONL) from ``preferences_file``."""

    def __init__(self, data: str, preferences_file: str, train_split: str | None = None, **kwargs) -> None:
        super().__init__(data, train_split=train_split, **kwargs)

    def build_train_set(self, data: RetrievalDataset) -> TrainingListDataset:
        return PreferenceDataset(data, self.hparams.preferences_file, self.hparams.seed)


class PointwiseDataModule(RerankingDataModule):
    """Trains on pointwise scored pairs from ``scores_file``."""

    def __init__(self, data: str, scores_file: str, train_split: str | None = None, **kwargs) -> None:
        super().__init__(data, train_split=train_split, **kwargs)

    def build_train_set(self, data: RetrievalDataset) -> TrainingListDataset:
        return ScoredPairDataset(data, self.hparams.scores_file, self.hparams.seed)


class CandidateGroupsDataModule(RerankingDataModule):
    """Trains on groups from the train split's qrels, negatives drawn from a candidate run's rank window.

    Args:
        train_candidates: ``bm25`` (computed on the fly to depth ``negative_rank_max``) or a TREC run file.
        group_size: documents per group, the positive included.
        negative_rank_min, negative_rank_max: the 1-based, inclusive rank window negatives are drawn from.
    """

    def __init__(self, data: str, train_candidates: str = BM25, group_size: int = 8, negative_rank_min: int = 10,
                 negative_rank_max: int = 100, **kwargs) -> None:
        super().__init__(data, **kwargs)

    def build_train_set(self, data: RetrievalDataset) -> TrainingListDataset:
        hp = self.hparams
        if not data.qrels:
            raise ResearchError("CandidateGroupsDataModule needs a train_split with qrels")
        run = candidate_run(hp.train_candidates, data, hp.negative_rank_max, list(data.judged_queries))
        return CandidateGroupDataset(data, run, hp.group_size, hp.negative_rank_min, hp.negative_rank_max,
                                     hp.relevance_level, hp.seed)
