"""Teacher scores for training data: a scoring model's score of each (query, document) pair of a pairs or groups file.

Input JSONL is either pairs ``{query_id, doc_id, ...}`` (each gets ``score``) or groups ``{query_id, positives,
negatives, ...}`` (each gets ``positive_scores`` and ``negative_scores``, aligned with the lists); other fields are
kept. Ids refer to a dataset, whose texts the scorer reads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from research.data.beir import RetrievalDataset
from research.errors import DataFormatError
from research.io import iter_jsonl
from research.models.runtime import inference_autocast
from research.models.scorers import PairScorer
from research.progress import stage

PairScore = Callable[[list[str], list[str]], list[float]]  # (query ids, doc ids) -> scores


def pair_score(scorer: PairScorer, data: RetrievalDataset, batch_size: int = 32, precision: str = "32-true",
               device: str = "cpu") -> PairScore:
    """``scorer`` on (query id, document id) pairs of ``data``: float scores, under ``precision``'s autocast."""
    def score(query_ids: list[str], doc_ids: list[str]) -> list[float]:
        with inference_autocast(precision, device):
            return scorer.score_pairs([data.queries[q] for q in query_ids], [data.corpus[d].full_text for d in doc_ids],
                                      batch_size).float().tolist()
    return score


def read_score_input(path: str | Path) -> tuple[str, list[tuple[int, dict[str, Any]]]]:
    """``("pairs" | "groups", records)``: pairs have ``query_id`` + ``doc_id``, groups ``query_id`` + ``positives``."""
    records = list(iter_jsonl(path))
    if not records:
        raise DataFormatError(path, None, None, "no records")
    kinds = set()
    for line, record in records:
        if "query_id" not in record:
            raise DataFormatError(path, line, "query_id", "missing")
        if "doc_id" in record:
            kinds.add("pairs")
        elif "positives" in record or "negatives" in record:
            kinds.add("groups")
        else:
            raise DataFormatError(path, line, None, "neither a pair (query_id, doc_id) nor a group (query_id, positives, negatives)")
    if len(kinds) > 1:
        raise DataFormatError(path, None, None, "mixes pairs (doc_id) and groups (positives/negatives)")
    return kinds.pop(), records


def score_records(kind: str, records: list[tuple[int, dict[str, Any]]], score: PairScore, path: str | Path = "<pairs>",
                  chunk: int = 8192) -> Iterator[dict[str, Any]]:
    """Records with teacher scores: pairs get ``score``; groups get ``positive_scores`` and ``negative_scores``.

    Pairs are scored ``chunk`` at a time (groups: whole groups up to about ``chunk`` pairs), records stream out in order.
    """
    def flat(record: dict[str, Any], line: int) -> list[tuple[str, str]]:
        qid = str(record["query_id"])
        if kind == "pairs":
            return [(qid, str(record["doc_id"]))]
        docs = []
        for name in ("positives", "negatives"):
            ids = record.get(name, [])
            if not isinstance(ids, list):
                raise DataFormatError(path, line, name, f"expected list, got {type(ids).__name__}")
            docs += [(qid, str(d)) for d in ids]
        return docs

    pending: list[tuple[dict[str, Any], list[tuple[str, str]]]] = []
    total = sum(len(flat(record, line)) for line, record in records)

    def flush() -> Iterator[dict[str, Any]]:
        pairs = [p for _, ps in pending for p in ps]
        scores = [float(s) for s in score([q for q, _ in pairs], [d for _, d in pairs])] if pairs else []
        if len(scores) != len(pairs):
            raise ValueError(f"scorer returned {len(scores)} scores for {len(pairs)} pairs")
        if not all(math.isfinite(s) for s in scores):
            raise ValueError("scorer returned non-finite scores")
        step.advance(len(pairs))
        at = 0
        for record, ps in pending:
            out = dict(record)
            if kind == "pairs":
                out["score"] = scores[at]
            else:
                n_pos = len(record.get("positives", []))
                out["positive_scores"] = scores[at:at + n_pos]
                out["negative_scores"] = scores[at + n_pos:at + len(ps)]
            at += len(ps)
            yield out
        pending.clear()

    size = 0
    with stage("scoring pairs", total=total, unit="pairs") as step:
        for line, record in records:
            ps = flat(record, line)
            pending.append((record, ps))
            size += len(ps)
            if size >= chunk:
                yield from flush()
                size = 0
        yield from flush()


def check_score_ids(kind: str, records: list[tuple[int, dict[str, Any]]], data: RetrievalDataset,
                    path: str | Path = "<pairs>") -> None:
    """Every query and document id of :func:`read_score_input`'s records is in ``data`` (else the line and field)."""
    fields = ("doc_id",) if kind == "pairs" else ("positives", "negatives")
    for line, record in records:
        qid = str(record["query_id"])
        if qid not in data.queries:
            raise DataFormatError(path, line, "query_id", f"unknown query '{qid}'")
        for name in fields:
            ids = [record[name]] if name == "doc_id" else record.get(name, [])
            for doc_id in ids if isinstance(ids, list) else []:
                if str(doc_id) not in data.corpus:
                    raise DataFormatError(path, line, name, f"unknown document '{doc_id}'")
