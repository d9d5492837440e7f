"""TREC run and qrels files: validated readers, an atomic writer, and trec_eval's ranking order.

A run line is ``qid Q0 docid rank score tag``; a TREC qrels line is ``qid iter docid rel``; a BEIR qrels
file is tab-separated ``query-id corpus-id score`` with an optional header. Every malformed line raises a
:class:`DataFormatError` naming the file, the 1-based line and the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from research.errors import DataFormatError
from research.io import atomic_write, iter_lines

Qrels = dict[str, dict[str, int]]
Run = dict[str, dict[str, float]]

RUN_FIELDS = ("query_id", "q0", "doc_id", "rank", "score", "run_tag")
QRELS_FIELDS = ("query_id", "iteration", "doc_id", "relevance")
TSV_QRELS_FIELDS = ("query-id", "corpus-id", "score")


def _trec_key(item: tuple[str, float]) -> tuple[float, str]:
    return item[1], item[0]


def ranking(scores: Mapping[str, float], depth: int | None = None) -> list[tuple[str, float]]:
    """``(doc_id, score)`` pairs in trec_eval order: score descending, ties by doc id descending."""
    ordered = sorted(scores.items(), key=_trec_key, reverse=True)
    return ordered if depth is None else ordered[:depth]


def truncate_run(run: Mapping[str, Mapping[str, float]], k: int) -> Run:
    """The top ``k`` documents of each query, in trec_eval order."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return {qid: dict(ranking(scores, k)) for qid, scores in run.items()}


def _check_token(value: str, what: str) -> str:
    if not value or any(c.isspace() for c in value):
        raise ValueError(f"{what} {value!r} is empty or contains whitespace")
    return value


def write_run(path: str | Path, run: Mapping[str, Mapping[str, float]], tag: str = "research",
              depth: int | None = None) -> None:
    """Write ``run`` atomically as ``qid Q0 docid rank score tag`` lines, ranks from 1 in trec_eval order.

    Scores are written with ``repr`` so they read back exactly; ``depth`` keeps the top documents per query.
    """
    _check_token(tag, "run tag")
    if depth is not None and depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    with atomic_write(path) as handle:
        for qid, scores in run.items():
            _check_token(qid, "query id")
            for rank, (doc_id, score) in enumerate(ranking(scores, depth), start=1):
                score = float(score)
                if not math.isfinite(score):
                    raise ValueError(f"query {qid!r} document {doc_id!r}: score {score} is not finite")
                handle.write(f"{qid} Q0 {_check_token(doc_id, 'document id')} {rank} {score!r} {tag}\n")


def _split(path: Path, number: int, text: str, names: tuple[str, ...], sep: str | None = None) -> list[str]:
    fields = text.split(sep)
    if sep is not None:
        fields = [field.strip() for field in fields]
    if len(fields) != len(names):
        how = "tab-separated" if sep == "\t" else "whitespace-separated"
        raise DataFormatError(path, number, None, f"expected {len(names)} {how} fields ({', '.join(names)}), got {len(fields)}")
    for field, name in zip(fields, names):
        if not field:
            raise DataFormatError(path, number, name, "empty")
    return fields


def _integer(path: Path, number: int, field: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataFormatError(path, number, field, f"expected an integer, got {value!r}") from None


def _add(table: dict, path: Path, number: int, qid: str, doc_id: str, value, field: str) -> None:
    docs = table.setdefault(qid, {})
    if doc_id in docs:
        raise DataFormatError(path, number, field, f"duplicate document {doc_id!r} for query {qid!r}")
    docs[doc_id] = value


def read_run(path: str | Path) -> Run:
    """Read a TREC run file; blank lines are skipped, a BOM and CRLF accepted."""
    path = Path(path)
    run: Run = {}
    for number, text in iter_lines(path):
        qid, _, doc_id, rank, score, _ = _split(path, number, text, RUN_FIELDS)
        _integer(path, number, "rank", rank)
        try:
            value = float(score)
        except ValueError:
            raise DataFormatError(path, number, "score", f"expected a number, got {score!r}") from None
        if not math.isfinite(value):
            raise DataFormatError(path, number, "score", f"not finite: {score!r}")
        _add(run, path, number, qid, doc_id, value, "doc_id")
    return run


def read_trec_qrels(path: str | Path) -> Qrels:
    """Read TREC qrels (``qid iter docid rel``, integer relevance)."""
    path = Path(path)
    qrels: Qrels = {}
    for number, text in iter_lines(path):
        qid, _, doc_id, rel = _split(path, number, text, QRELS_FIELDS)
        _add(qrels, path, number, qid, doc_id, _integer(path, number, "relevance", rel), "doc_id")
    return qrels


def read_tsv_qrels(path: str | Path, has_header: bool | None = None) -> Qrels:
    """Read BEIR ``qrels/*.tsv`` (``query-id<TAB>corpus-id<TAB>score``, integer scores).

    ``has_header=None`` treats the first line as a header when its score column is a word (``score``), so a
    mistyped score on the first data line is still an error, not a silently skipped header.
    """
    path = Path(path)
    qrels: Qrels = {}
    for index, (number, text) in enumerate(iter_lines(path)):
        qid, doc_id, score = _split(path, number, text, TSV_QRELS_FIELDS, sep="\t")
        if index == 0 and (has_header or (has_header is None and score.strip().isalpha())):
            continue
        _add(qrels, path, number, qid, doc_id, _integer(path, number, "score", score), "corpus-id")
    return qrels

