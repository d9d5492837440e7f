"""JSONL training formats for re-rankers; ids refer to a BEIR dataset's ``queries.jsonl`` and ``corpus.jsonl``.

Listwise groups, one object per line (``labels`` is the default target field; a teacher's scores work the same way
under another field name, e.g. ``"scores"``, chosen with ``target_field``)::

    {"query_id": str, "doc_ids": [str, ...], "labels": [number, ...]}

    ``doc_ids``: distinct, at least one; the target list is aligned with it (binary or graded labels, or teacher
    scores), finite numbers. A query may have several groups.

Pairwise preferences (the zELO votes format, :mod:`research.data.votes`)::

    {"query_id": str, "doc_a": str, "doc_b": str, "p": number, "judges": {name: number}?}

    ``p`` in [0, 1]: the probability that ``doc_a`` is more relevant than ``doc_b``; ``doc_a != doc_b``.

Pointwise scored pairs::

    {"query_id": str, "doc_id": str, "score": number}

    ``score``: a finite label or teacher score; each (query_id, doc_id) at most once.

Every malformed record raises :class:`research.errors.DataFormatError` naming the file, the line and the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from research.data.beir import RetrievalDataset
from research.data.votes import Vote, read_votes
from research.errors import DataFormatError
from research.io import iter_jsonl, iter_lines, require_field


@dataclass(frozen=True)
class ListwiseGroup:
    """A query with candidate documents and one target each (label or teacher score)."""

    query_id: str
    doc_ids: tuple[str, ...]
    targets: tuple[float, ...]


@dataclass(frozen=True)
class ScoredPair:
    """A (query, document) pair with a label or teacher score."""

    query_id: str
    doc_id: str
    score: float


def _known_query(record: dict[str, Any], data: RetrievalDataset, path: Path, line: int) -> str:
    query_id = require_field(record, "query_id", str, path, line)
    if query_id not in data.queries:
        raise DataFormatError(path, line, "query_id", f"unknown query '{query_id}'")
    return query_id


def _known_doc(doc_id: Any, data: RetrievalDataset, path: Path, line: int, field: str) -> str:
    if not isinstance(doc_id, str) or not doc_id.strip():
        raise DataFormatError(path, line, field, f"expected a non-empty string, got {doc_id!r}")
    if doc_id not in data.corpus:
        raise DataFormatError(path, line, field, f"unknown document '{doc_id}'")
    return doc_id


def _finite(value: Any, path: Path, line: int, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataFormatError(path, line, field, f"expected a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise DataFormatError(path, line, field, f"not finite: {value!r}")
    return float(value)


def read_listwise_groups(path: str | Path, data: RetrievalDataset, target_field: str = "labels") -> list[ListwiseGroup]:
    """Read and validate a listwise groups file against ``data``'s ids."""
    path = Path(path)
    groups = []
    for line, record in iter_jsonl(path):
        query_id = _known_query(record, data, path, line)
        doc_ids = require_field(record, "doc_ids", list, path, line)
        if not doc_ids:
            raise DataFormatError(path, line, "doc_ids", "empty")
        doc_ids = [_known_doc(d, data, path, line, "doc_ids") for d in doc_ids]
        if len(set(doc_ids)) != len(doc_ids):
            raise DataFormatError(path, line, "doc_ids", "repeats a document")
        targets = require_field(record, target_field, list, path, line)
        if len(targets) != len(doc_ids):
            raise DataFormatError(path, line, target_field, f"expected {len(doc_ids)} numbers (one per doc_ids entry), got {len(targets)}")
        targets = [_finite(t, path, line, target_field) for t in targets]
        groups.append(ListwiseGroup(query_id, tuple(doc_ids), tuple(targets)))
    if not groups:
        raise DataFormatError(path, None, None, "no groups")
    return groups


def read_preferences(path: str | Path, data: RetrievalDataset) -> list[Vote]:
    """Read a pairwise preferences (zELO votes) file with :func:`read_votes`, and check its ids against ``data``."""
    path = Path(path)
    votes = read_votes(path)
    for (line, _), vote in zip(iter_lines(path), votes):  # read_votes keeps one vote per non-blank line
        if vote.query_id not in data.queries:
            raise DataFormatError(path, line, "query_id", f"unknown query '{vote.query_id}'")
        for field, doc_id in (("doc_a", vote.doc_a), ("doc_b", vote.doc_b)):
            _known_doc(doc_id, data, path, line, field)
    if not votes:
        raise DataFormatError(path, None, None, "no preferences")
    return votes


def read_scored_pairs(path: str | Path, data: RetrievalDataset) -> list[ScoredPair]:
    """Read and validate a pointwise scored pairs file against ``data``'s ids."""
    path = Path(path)
    pairs, seen = [], set()
    for line, record in iter_jsonl(path):
        query_id = _known_query(record, data, path, line)
        doc_id = _known_doc(require_field(record, "doc_id", str, path, line), data, path, line, "doc_id")
        if (query_id, doc_id) in seen:
            raise DataFormatError(path, line, "doc_id", f"duplicate pair ('{query_id}', '{doc_id}')")
        seen.add((query_id, doc_id))
        if "score" not in record:
            raise DataFormatError(path, line, "score", "missing")
        pairs.append(ScoredPair(query_id, doc_id, _finite(record["score"], path, line, "score")))
    if not pairs:
        raise DataFormatError(path, None, None, "no scored pairs")
    return pairs
