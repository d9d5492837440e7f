"""Pairwise judge votes: one JSONL line per judged pair, written atomically or appended for resumable collection."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from research.errors import DataFormatError
from research.io import atomic_write, iter_lines, require_field


@dataclass(frozen=True)
class Vote:
    """``p``: probability that ``doc_a`` is more relevant to the query than ``doc_b`` (judge ensemble mean)."""

    query_id: str
    doc_a: str
    doc_b: str
    p: float
    judges: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if self.doc_a == self.doc_b:
            raise ValueError(f"Vote: doc_a and doc_b are both {self.doc_a!r}")
        for name, value in {"p": self.p, **(self.judges or {})}.items():
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"Vote: {name} = {value!r} is not a probability in [0, 1]")

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"query_id": self.query_id, "doc_a": self.doc_a, "doc_b": self.doc_b,
                                  "p": float(self.p)}
        if self.judges is not None:
            record["judges"] = {name: float(value) for name, value in self.judges.items()}
        return record


def write_votes(path: str | Path, votes: Iterable[Vote]) -> int:
    """Write ``votes`` as JSONL, atomically; returns the number of lines."""
    count = 0
    with atomic_write(path) as handle:
        for vote in votes:
            handle.write(_dumps(vote))
            count += 1
    return count


def append_votes(path: str | Path, votes: Iterable[Vote]) -> int:
    """Append ``votes`` one flushed line each, so an interrupted collection resumes from what reached disk.

    A partial last line left by a crash is cut off first (or, if it is a whole JSON object that only lacks its
    newline, completed), so new lines never fuse with it. ``votes`` may be a lazy generator of judge calls.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _repair_tail(path)
    count = 0
    with open(path, "a", encoding="utf-8") as handle:
        for vote in votes:
            handle.write(_dumps(vote))
            handle.flush()
            count += 1
        os.fsync(handle.fileno())
    return count


def read_votes(path: str | Path, *, allow_truncated_tail: bool = False) -> list[Vote]:
    """Read and validate a votes file; errors name the file, line and field.

    With ``allow_truncated_tail`` an undecodable last line with no trailing newline (a write cut short) is skipped.
    """
    votes: list[Vote] = []
    decoded = 0
    try:
        for number, text in iter_lines(path):
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataFormatError(path, number, None, f"invalid JSON ({err.msg} at column {err.colno})") from None
            decoded = number
            votes.append(_parse(record, path, number))
    except DataFormatError as err:
        undecodable = err.line is not None and err.line > decoded
        if not (allow_truncated_tail and undecodable and _is_partial_tail(Path(path), err.line)):
            raise
    return votes


def voted_pairs(votes: Iterable[Vote]) -> set[tuple[str, frozenset[str]]]:
    """``(query_id, {doc_a, doc_b})`` for each vote: the pairs a resumed collection can skip."""
    return {(vote.query_id, frozenset((vote.doc_a, vote.doc_b))) for vote in votes}


def _parse(record: Any, path: str | Path, line: int) -> Vote:
    if not isinstance(record, dict):
        raise DataFormatError(path, line, None, f"expected a JSON object, got {type(record).__name__}")
    query_id, doc_a, doc_b = (require_field(record, name, str, path, line) for name in ("query_id", "doc_a", "doc_b"))
    if doc_a == doc_b:
        raise DataFormatError(path, line, "doc_b", f"same document as doc_a ({doc_a!r})")
    if "p" not in record:
        raise DataFormatError(path, line, "p", "missing")
    p = _probability(record["p"], path, line, "p")
    judges = record.get("judges")
    if judges is not None:
        if not isinstance(judges, dict):
            raise DataFormatError(path, line, "judges", f"expected object, got {type(judges).__name__}")
        judges = {name: _probability(value, path, line, f"judges.{name}") for name, value in judges.items()}
    return Vote(query_id, doc_a, doc_b, float(p), judges)


def _probability(value: Any, path: str | Path, line: int, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataFormatError(path, line, field, f"expected number, got {type(value).__name__}")
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise DataFormatError(path, line, field, f"{value!r} is not a probability in [0, 1]")
    return float(value)


def _dumps(vote: Vote) -> str:
    return json.dumps(vote.to_record(), ensure_ascii=False, allow_nan=False) + "\n"


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() == 0:
            return True
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def _is_partial_tail(path: Path, line: int) -> bool:
    """Whether ``line`` is the last line of ``path`` and lacks its newline."""
    data = path.read_bytes()
    return not data.endswith(b"\n") and line == data.count(b"\n") + 1


def _repair_tail(path: Path) -> None:
    """Cut an unparsable partial last line off ``path``, or newline-terminate a complete one."""
    if not path.is_file() or _ends_with_newline(path):
        return
    data = path.read_bytes()
    start = data.rfind(b"\n") + 1
    try:
        complete = isinstance(json.loads(data[start:].decode("utf-8")), dict)
    except (UnicodeDecodeError, json.JSONDecodeError):
        complete = False
    with open(path, "r+b") as handle:
        if complete:
            handle.seek(0, os.SEEK_END)
            handle.write(b"\n")
        else:
            handle.truncate(start)
