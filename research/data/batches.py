"""Typed batches that DataModules hand to LightningModules."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class GroupBatch:
    """Queries, each with a group of documents (its positive first, then negatives) and per-document targets.

    ``targets[i, j]`` is the label (1 positive, 0 negative, or a graded value) of ``documents[i][j]``;
    ``teacher_scores`` holds a teacher's scores for the same documents when the data has them (NaN for a document
    the teacher did not score, e.g. a random negative topping up a short mined group).
    ``positive_ids[i]`` are all documents labelled relevant for query ``i`` (to mask false in-batch negatives).
    """

    query_ids: list[str]
    queries: list[str]
    doc_ids: list[list[str]]
    documents: list[list[str]]
    targets: Tensor
    positive_ids: list[frozenset[str]]
    teacher_scores: Tensor | None = None

    def __len__(self) -> int:
        return len(self.queries)

    @property
    def group_size(self) -> int:
        return len(self.documents[0]) if self.documents else 0


@dataclass
class EncodeBatch:
    """Texts to embed during evaluation: queries or documents, with their ids."""

    ids: list[str]
    texts: list[str]
    is_query: bool

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class PairGroupBatch:
    """Queries, each with a group of documents and a target per document (label, teacher score or preference).

    ``doc_ids[i]`` / ``documents[i]`` have ``mask[i].sum()`` entries; ``targets`` and ``mask`` are ``[Q, G]``,
    padded with 0 / False beyond each group's end.
    """

    query_ids: list[str]
    queries: list[str]
    doc_ids: list[list[str]]
    documents: list[list[str]]
    targets: Tensor
    mask: Tensor

    def __len__(self) -> int:
        return len(self.queries)

    @property
    def group_size(self) -> int:
        return int(self.targets.shape[1])


@dataclass
class PairBatch:
    """(query, document) pairs to score in evaluation, with their ids."""

    query_ids: list[str]
    doc_ids: list[str]
    queries: list[str]
    documents: list[str]

    def __len__(self) -> int:
        return len(self.queries)
