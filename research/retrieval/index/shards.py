"""Shard files of an index directory: written atomically, read memory-mapped, never read half-written.

Shard ``s`` holds corpus rows ``[s * shard_size, ...)`` in corpus order as three files under ``shards/``:
``NNNNNN.npy`` (embeddings ``[rows, dim]``, float32 or float16), ``NNNNNN.ids.npy`` (the ids, fixed-width UTF-8
bytes) and ``NNNNNN.json`` (rows, dtype, byte sizes and a blake2b of the embeddings). Each is renamed into place
once complete and the ``.json`` comes last, so a shard counts as done only when all three are there; reading checks
the files against it, and a file cut short, of another shape or another dtype is an error naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from research.errors import DataFormatError
from research.io import write_json
from research.retrieval.index.manifest import IndexManifest

SHARDS = "shards"


def shard_paths(directory: str | Path, shard: int) -> tuple[Path, Path, Path]:
    """(embeddings, ids, done marker) of ``shard``."""
    base = Path(directory) / SHARDS / f"{shard:06d}"
    return base.with_suffix(".npy"), base.with_name(base.name + ".ids.npy"), base.with_suffix(".json")


def _save_npy(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, array, allow_pickle=False)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def encode_ids(ids: list[str]) -> np.ndarray:
    encoded = [i.encode("utf-8") for i in ids]
    return np.array(encoded, dtype=f"S{max(1, max(map(len, encoded), default=1))}")


def write_shard(directory: str | Path, manifest: IndexManifest, shard: int, ids: list[str],
                embeddings: np.ndarray) -> None:
    """Write one complete shard (embeddings cast to the manifest's dtype), the done marker last."""
    start, rows = manifest.shard_rows(shard)
    if embeddings.shape != (rows, manifest.dim) or len(ids) != rows:
        raise ValueError(f"shard {shard}: {embeddings.shape} embeddings and {len(ids)} ids, expected {rows} x {manifest.dim}")
    emb_path, ids_path, done = shard_paths(directory, shard)
    emb_path.parent.mkdir(parents=True, exist_ok=True)
    stored = np.ascontiguousarray(embeddings, dtype=manifest.dtype)
    _save_npy(emb_path, stored)
    _save_npy(ids_path, encode_ids(ids))
    write_json(done, {"shard": shard, "start": start, "rows": rows, "dim": manifest.dim, "dtype": manifest.dtype,
                      "embedding_bytes": emb_path.stat().st_size, "id_bytes": ids_path.stat().st_size,
                      "blake2b": hashlib.blake2b(stored.tobytes(), digest_size=20).hexdigest(),
                      "key": manifest.key()})


def is_done(directory: str | Path, shard: int) -> bool:
    return shard_paths(directory, shard)[2].is_file()


def missing_shards(directory: str | Path, manifest: IndexManifest) -> list[int]:
    """Shards without a done marker (or whose marker is of another key), in order."""
    out = []
    for shard in range(manifest.num_shards):
        done = shard_paths(directory, shard)[2]
        if not done.is_file():
            out.append(shard)
            continue
        try:
            key = json.loads(done.read_text()).get("key")
        except (json.JSONDecodeError, UnicodeDecodeError):
            key = None
        if key != manifest.key():
            out.append(shard)
    return out


def assign(missing: list[int], rank: int, world: int) -> list[int]:
    """This rank's share of the missing shards: every ``world``-th, from the ``rank``-th."""
    return missing[rank::world]


@dataclass
class Shard:
    """One verified shard: memory-mapped embeddings ``[rows, dim]`` and ids, starting at corpus row ``start``."""

    number: int
    start: int
    embeddings: np.ndarray
    ids: np.ndarray

    def doc_id(self, row: int) -> str:
        return bytes(self.ids[row]).decode("utf-8")

    def float32(self) -> np.ndarray:
        return np.ascontiguousarray(self.embeddings, dtype=np.float32)


def _expected_npy(path: Path, shape: tuple[int, ...], dtype: str, size: int) -> np.ndarray:
    if not path.is_file():
        raise DataFormatError(path, None, None, "shard file missing (its done marker is there: the index was altered)")
    actual = path.stat().st_size
    if actual != size:
        raise DataFormatError(path, None, None, f"shard file cut short or altered: {actual} bytes, expected {size}")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as err:
        raise DataFormatError(path, None, None, f"not a readable .npy shard ({err})") from None
    if array.shape[0] != shape[0] or array.shape[1:] != shape[1:] or (dtype and str(array.dtype) != dtype):
        raise DataFormatError(path, None, None, f"shard of shape {array.shape} {array.dtype}, expected {shape} {dtype}")
    return array


def open_shard(directory: str | Path, manifest: IndexManifest, shard: int, verify: bool = False) -> Shard:
    """A complete shard, checked against its marker and the manifest (``verify``: its checksum too)."""
    emb_path, ids_path, done = shard_paths(directory, shard)
    if not done.is_file():
        raise DataFormatError(done, None, None, f"shard {shard} is not complete (resume research index to finish it)")
    try:
        marker = json.loads(done.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataFormatError(done, None, None, f"not a readable shard marker ({err})") from None
    start, rows = manifest.shard_rows(shard)
    if marker.get("key") != manifest.key() or marker.get("rows") != rows or marker.get("start") != start:
        raise DataFormatError(done, None, None, "shard made with other settings than the manifest (or moved here)")
    embeddings = _expected_npy(emb_path, (rows, manifest.dim), manifest.dtype, marker["embedding_bytes"])
    ids = _expected_npy(ids_path, (rows,), "", marker["id_bytes"])
    if verify and hashlib.blake2b(np.ascontiguousarray(embeddings).tobytes(), digest_size=20).hexdigest() != marker["blake2b"]:
        raise DataFormatError(emb_path, None, None, "shard checksum differs from its marker: the file was altered")
    return Shard(shard, start, embeddings, ids)
