"""Training groups: (query, positives, negatives) read from qrels and an optional groups JSONL file.

Groups JSONL schema, one object per line::

    {"query_id": str, "positives": [str, ...], "negatives": [str, ...],
     "positive_scores": [float, ...]?, "negative_scores": [float, ...]?}

Ids refer to the dataset's queries and corpus; scores (optional) are a teacher's, aligned with the lists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from research.data.trec import Qrels
from research.errors import DataFormatError
from research.io import iter_jsonl, require_field


@dataclass
class TrainingGroup:
    query_id: str
    positives: list[str]
    negatives: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)


def qrels_positives(qrels: Qrels, relevance_level: int = 1) -> dict[str, list[str]]:
    """Each query's positives: its documents graded ``>= relevance_level``, in qrels order; queries without any are left out.

    The one definition of a positive, shared by training groups, hard-negative mining and the re-ranker DataModules.
    """
    positives = {}
    for query_id, docs in qrels.items():
        found = [doc for doc, grade in docs.items() if grade >= relevance_level]
        if found:
            positives[query_id] = found
    return positives


def groups_from_qrels(qrels: Qrels, relevance_level: int = 1) -> dict[str, TrainingGroup]:
    return {query_id: TrainingGroup(query_id, positives)
            for query_id, positives in qrels_positives(qrels, relevance_level).items()}


def read_groups(path, queries: dict[str, str], corpus: dict) -> dict[str, TrainingGroup]:
    """Read and validate a groups JSONL file against the dataset's ids."""
    groups: dict[str, TrainingGroup] = {}
    for line, record in iter_jsonl(path):
        query_id = str(require_field(record, "query_id", (str, int), path, line))
        if query_id not in queries:
            raise DataFormatError(path, line, "query_id", f"unknown query '{query_id}'")
        if query_id in groups:
            raise DataFormatError(path, line, "query_id", f"duplicate group for query '{query_id}'")
        lists = {}
        for name in ("positives", "negatives"):
            ids = record.get(name, [])
            if not isinstance(ids, list):
                raise DataFormatError(path, line, name, f"expected list, got {type(ids).__name__}")
            for doc_id in ids:
                if str(doc_id) not in corpus:
                    raise DataFormatError(path, line, name, f"unknown document '{doc_id}'")
            lists[name] = [str(d) for d in ids]
            score_key = name[:-1] + "_scores"
            if score_key in record:
                scores = record[score_key]
                if not isinstance(scores, list) or len(scores) != len(ids):
                    raise DataFormatError(path, line, score_key, f"expected a list of {len(ids)} numbers")
                if not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scores):
                    raise DataFormatError(path, line, score_key, "expected finite numbers")
        scores = {}
        for name in ("positives", "negatives"):
            scores.update(zip(lists[name], map(float, record.get(name[:-1] + "_scores", []))))
        groups[query_id] = TrainingGroup(query_id, lists["positives"], lists["negatives"], scores)
    if not groups:  # given, but empty (e.g. mining was cut short): not silently training without its negatives
        raise DataFormatError(path, None, None, "no groups")
    return groups
