"""Byte-offset indexes of line-based corpora: random access to ``corpus.jsonl`` / ``collection.tsv`` without a dict.

One validating pass over the file records each record's byte offset and line number and the sorted 64-bit hashes of
the ids (duplicates are refused there, naming the line). The arrays are saved as ``.npy`` under the cache
(``$RESEARCH_CACHE_DIR/offsets/<key>/``, the key hashing the file's path, size and modification time) and
memory-mapped, so every DDP rank reading the same corpus shares them, and the text, through the page cache.

:class:`OffsetCorpus` is a read-only ``Mapping[id, value]`` over such a file: ``corpus[doc_id]`` (a binary search of
the hashes, then one line read), ``in``, ``len``, iteration in file order, and :meth:`OffsetCorpus.rows` for a
contiguous block. Records are parsed by the reader's own ``parse(path, line, text)``, so a malformed line raises the
same :class:`DataFormatError` (file, line, field) as the in-memory readers.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from array import array
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np

from research.errors import DataFormatError
from research.io import cache_root

V = TypeVar("V")
# parse(path, line number, line text) -> (id, value); raises DataFormatError for a malformed record
Parse = Callable[[Path, int, str], tuple[str, V]]
FORMAT = 1
_BOM = b"\xef\xbb\xbf"


def offsets_root() -> Path:
    return cache_root("offsets")


def id_hash(doc_id: str) -> int:
    """Stable signed 64-bit hash of an id (blake2b: equal in every process)."""
    return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def _decode(path: Path, number: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as err:
        raise DataFormatError(path, number, None, f"not valid UTF-8 (byte {err.start})") from None


class LineIndex:
    """Offsets (``[n + 1]``, the last one the end of the file), line numbers ``[n]`` and the id hashes sorted with
    their rows, memory-mapped from the folder :meth:`open` built or found."""

    def __init__(self, folder: Path, meta: dict) -> None:
        self.folder, self.meta = folder, meta
        self.offsets = np.load(folder / "offsets.npy", mmap_mode="r")
        self.lines = np.load(folder / "lines.npy", mmap_mode="r")
        self.hashes = np.load(folder / "hashes.npy", mmap_mode="r")
        self.order = np.load(folder / "order.npy", mmap_mode="r")

    def __len__(self) -> int:
        return len(self.lines)

    @property
    def digest(self) -> str:
        """blake2b of the file's bytes, computed in the building pass."""
        return self.meta["digest"]

    @classmethod
    def open(cls, path: str | Path, parse: Parse, kind: str, id_field: str | None = None) -> LineIndex:
        """The index of ``path`` from the cache, built (under a file lock: one builder, the other ranks wait) if
        missing or stale. ``kind`` names the record format (part of the key); ``id_field`` is named in a duplicate
        id's error."""
        path = Path(path).resolve()
        if not path.is_file():
            raise DataFormatError(path, None, None, "file not found")
        stat = path.stat()
        key = hashlib.blake2b(json.dumps([FORMAT, str(path), stat.st_size, stat.st_mtime_ns, kind]).encode(),
                              digest_size=12).hexdigest()
        root = offsets_root()
        folder = root / key
        root.mkdir(parents=True, exist_ok=True)
        with open(root / f".{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (folder / "meta.json").is_file():
                _build(path, parse, id_field, folder, {"format": FORMAT, "path": str(path), "size": stat.st_size,
                                             "mtime_ns": stat.st_mtime_ns, "kind": kind})
        return cls(folder, json.loads((folder / "meta.json").read_text()))


def _build(path: Path, parse: Parse, id_field: str | None, folder: Path, meta: dict) -> None:
    """One pass: validate every record, collect offsets, lines and id hashes; refuse duplicate ids; save atomically."""
    offsets, lines, hashes = array("q"), array("q"), array("q")
    digest = hashlib.blake2b(digest_size=20)
    position = 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            digest.update(raw)
            start = position
            position += len(raw)
            if number == 1 and raw.startswith(_BOM):
                raw, start = raw[3:], start + 3
            text = _decode(path, number, raw)
            if not text.strip():
                continue
            doc_id, _ = parse(path, number, text)
            offsets.append(start)
            lines.append(number)
            hashes.append(id_hash(doc_id))
    if not lines:
        raise DataFormatError(path, None, None, "no documents")
    offsets.append(position)
    hash_array = np.frombuffer(hashes, dtype=np.int64)
    order = np.argsort(hash_array, kind="stable")
    sorted_hashes = hash_array[order]
    clash = np.flatnonzero(sorted_hashes[1:] == sorted_hashes[:-1])
    if len(clash):
        index = _Reader(path, np.frombuffer(offsets, dtype=np.int64), np.frombuffer(lines, dtype=np.int64), parse)
        for at in clash:  # equal hashes: a duplicate id unless (odds ~n^2/2^64) two ids collide
            first, second = sorted(int(r) for r in order[at:at + 2])
            doc_id = index.record(first)[0]
            if doc_id == index.record(second)[0]:
                raise DataFormatError(path, int(lines[second]), id_field, f"duplicate id '{doc_id}'")
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        np.save(tmp / "offsets.npy", np.frombuffer(offsets, dtype=np.int64))
        np.save(tmp / "lines.npy", np.frombuffer(lines, dtype=np.int64))
        np.save(tmp / "hashes.npy", sorted_hashes)
        np.save(tmp / "order.npy", order.astype(np.int64))
        (tmp / "meta.json").write_text(json.dumps({**meta, "count": len(lines), "digest": digest.hexdigest()}))
        if folder.exists():  # a stale or half-built folder (a crash before the rename leaves only a temporary one)
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class _Reader:
    """Reads records by row from the file through its offsets."""

    def __init__(self, path: Path, offsets: np.ndarray, lines: np.ndarray, parse: Parse) -> None:
        self.path, self.offsets, self.lines, self.parse = path, offsets, lines, parse
        self._handle = None

    def _read(self, start: int, stop: int) -> bytes:
        if self._handle is None or self._handle.closed or self._pid != os.getpid():  # a forked worker: own handle
            self._handle, self._pid = open(self.path, "rb"), os.getpid()
        self._handle.seek(int(self.offsets[start]))
        return self._handle.read(int(self.offsets[stop]) - int(self.offsets[start]))

    def records(self, start: int, stop: int) -> list[tuple[str, object]]:
        """Rows ``start .. stop-1`` parsed, in file order (blank lines between records are skipped)."""
        if start >= stop:
            return []
        raw = self._read(start, stop)
        base = int(self.offsets[start])
        out = []
        for row in range(start, stop):
            begin, end = int(self.offsets[row]) - base, int(self.offsets[row + 1]) - base
            chunk = raw[begin:end]
            newline = chunk.find(b"\n")
            number = int(self.lines[row])
            text = _decode(self.path, number, chunk if newline < 0 else chunk[:newline + 1])
            out.append(self.parse(self.path, number, text))
        return out

    def record(self, row: int) -> tuple[str, object]:
        return self.records(row, row + 1)[0]

    def close(self) -> None:
        if self._handle is not None:
            with contextlib.suppress(OSError):
                self._handle.close()


class OffsetCorpus(Mapping[str, V], Generic[V]):
    """A read-only mapping ``id -> value`` over a line-based file, backed by a memory-mapped :class:`LineIndex`.

    Nothing but the index arrays (24 bytes a record, memory-mapped) is held: values are parsed when read. Iteration,
    :meth:`items` and :meth:`values` stream the file in file order in blocks of ``block`` records.
    """

    def __init__(self, path: str | Path, parse: Parse, kind: str, id_field: str | None = None,
                 block: int = 4096) -> None:
        self.path, self._parse, self._kind, self._id_field, self.block = Path(path), parse, kind, id_field, block
        self._open()

    def _open(self) -> None:
        self.index = LineIndex.open(self.path, self._parse, self._kind, self._id_field)
        self._reader = _Reader(self.path, self.index.offsets, self.index.lines, self._parse)

    def __getstate__(self) -> dict:  # for DataLoader workers and spawned ranks: reopen, never copy the arrays
        return {"path": self.path, "_parse": self._parse, "_kind": self._kind, "_id_field": self._id_field,
                "block": self.block}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return len(self.index)

    @property
    def digest(self) -> str:
        """Content digest of the file (what an embedding cache keys the corpus on)."""
        return self.index.digest

    def rows(self, start: int, stop: int) -> list[tuple[str, V]]:
        """``(id, value)`` of rows ``start .. stop-1`` in file order: one contiguous read."""
        stop = min(stop, len(self))
        return self._reader.records(max(start, 0), stop)  # type: ignore[return-value]

    def row_of(self, doc_id: str) -> int | None:
        """The row of ``doc_id``, or None."""
        key = id_hash(doc_id)
        hashes = self.index.hashes
        at = int(np.searchsorted(hashes, key))
        while at < len(hashes) and hashes[at] == key:
            row = int(self.index.order[at])
            if self._reader.record(row)[0] == doc_id:
                return row
            at += 1
        return None

    def __getitem__(self, doc_id: str) -> V:
        row = self.row_of(doc_id) if isinstance(doc_id, str) else None
        if row is None:
            raise KeyError(doc_id)
        return self._reader.record(row)[1]  # type: ignore[return-value]

    def __contains__(self, doc_id: object) -> bool:
        return isinstance(doc_id, str) and self.row_of(doc_id) is not None

    def _blocks(self) -> Iterator[list[tuple[str, V]]]:
        for start in range(0, len(self), self.block):
            yield self.rows(start, start + self.block)

    def __iter__(self) -> Iterator[str]:
        for block in self._blocks():
            yield from (doc_id for doc_id, _ in block)

    def items(self):  # streamed in file order, not one lookup per key
        return _Streamed(self, lambda item: item)

    def values(self):
        return _Streamed(self, lambda item: item[1])


class _Streamed:
    """A re-iterable view over an :class:`OffsetCorpus` in file order."""

    def __init__(self, corpus: OffsetCorpus, pick: Callable) -> None:
        self.corpus, self.pick = corpus, pick

    def __len__(self) -> int:
        return len(self.corpus)

    def __iter__(self) -> Iterator:
        for block in self.corpus._blocks():
            yield from map(self.pick, block)
