"""Search over an index directory: exact top-k merged across shards, or a faiss factory index saved beside them.

Exact search (the default) takes one shard at a time from its memory map, computes that shard's exact top-k
(:func:`research.retrieval.dense.block_top_k`) and merges it into the running top-k
(:func:`~research.retrieval.dense.merge_top_k`): the corpus top-k is exactly the top-k of the union of the shards'
top-k, and host memory is one shard plus ``[queries, k]``. With ``gpu`` the shards go into one flat index sharded over
all GPUs instead. ``factory`` (``IVF4096,Flat``, ``IVF16384,PQ64``, ``HNSW32``, ...) builds that faiss index, trained on
a seeded sample of the shards when it needs training, and saves it as ``faiss/<name>.faiss`` with a ``.json`` of what
made it; a later search with the same factory, sample and shards loads it instead of building again.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from research import progress
from research.data.trec import Run
from research.errors import DataFormatError, ResearchError
from research.io import write_json
from research.retrieval import dense
from research.retrieval.index.manifest import IndexManifest, read_manifest
from research.retrieval.index.shards import Shard, missing_shards, open_shard, shard_paths

FAISS_DIR = "faiss"


class ShardedIndex:
    """A complete index directory: its manifest and every shard, verified and memory-mapped (nothing loaded)."""

    def __init__(self, directory: str | Path, verify: bool = False) -> None:
        self.directory = Path(directory)
        self.manifest: IndexManifest = read_manifest(self.directory)
        missing = missing_shards(self.directory, self.manifest)
        if missing:
            raise DataFormatError(shard_paths(self.directory, missing[0])[2], None, None,
                                  f"{len(missing)} of {self.manifest.num_shards} shards are not complete "
                                  f"(resume research index with the same --out to finish them)")
        self.shards: list[Shard] = [open_shard(self.directory, self.manifest, s, verify)
                                    for s in range(self.manifest.num_shards)]

    def __len__(self) -> int:
        return self.manifest.count

    def doc_id(self, row: int) -> str:
        return self.shards[row // self.manifest.shard_size].doc_id(row % self.manifest.shard_size)

    def doc_ids(self) -> list[str]:
        """Every id in corpus order (a list: memory grows with the corpus; for mining and tests)."""
        return [bytes(i).decode("utf-8") for shard in self.shards for i in shard.ids]

    def blocks(self) -> Iterator[np.ndarray]:
        """Each shard's embeddings as float32, one at a time."""
        for shard in self.shards:
            yield shard.float32()

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """float32 embeddings of arbitrary corpus rows (in the given order)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.manifest.dim), dtype=np.float32)
        size = self.manifest.shard_size
        for shard in np.unique(rows // size):
            hit = np.flatnonzero(rows // size == shard)
            out[hit] = self.shards[int(shard)].embeddings[rows[hit] - int(shard) * size]
        return out

    def sample(self, count: int, seed: int = 0) -> np.ndarray:
        """``count`` rows drawn without replacement (seeded), in row order, as float32: a training sample."""
        rows = np.sort(np.random.default_rng(seed).choice(len(self), size=min(count, len(self)), replace=False))
        return self.vectors(rows)


@dataclass
class SearchInfo:
    """How a search went: the index used, whether it was built now (and in how long), and the search time."""

    kind: str
    built: bool = False
    build_seconds: float = 0.0
    search_seconds: float = 0.0
    path: str | None = None
    train_size: int = 0


def exact_top_k(index: ShardedIndex, queries: np.ndarray, k: int, gpu: bool = False,
                query_batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` scores and corpus rows ``[Q, k]`` over every shard (see the module docstring)."""
    if gpu:
        flat = dense.gpu_flat_index(index.manifest.dim, index.blocks(), index.manifest.dtype == "float16")
        return _batched(flat, queries, k, query_batch)
    best = (np.full((len(queries), k), -np.inf, dtype=np.float32), np.full((len(queries), k), -1, dtype=np.int64))
    with progress.stage("searching shards", total=len(index.shards), unit="shards") as step:
        for shard in index.shards:
            best = dense.merge_top_k(best, dense.block_top_k(queries, shard.float32(), k, shard.start), k)
            step.advance(1)
    return best


def _batched(faiss_index, queries: np.ndarray, k: int, query_batch: int) -> tuple[np.ndarray, np.ndarray]:
    parts = [dense.index_top_k(faiss_index, queries[s:s + query_batch], k) for s in range(0, len(queries), query_batch)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]).astype(np.int64)


def factory_slug(factory: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", factory).strip("_") or "index"


def factory_index(index: ShardedIndex, factory: str, train_size: int | None = None, seed: int = 0):
    """The faiss index ``factory`` over ``index``: loaded from ``faiss/`` when made with the same settings, else
    trained, filled, saved (atomically) and returned. Also returns its :class:`SearchInfo`."""
    path = index.directory / FAISS_DIR / f"{factory_slug(factory)}.faiss"
    meta_path = path.with_suffix(".json")
    empty = dense.new_factory_index(factory, index.manifest.dim)
    size = dense.default_train_size(empty, len(index)) if train_size is None else min(train_size, len(index))
    wanted = {"factory": factory, "index_key": index.manifest.key(), "count": len(index), "train_size": size,
              "seed": seed}
    if path.is_file() and meta_path.is_file():
        try:
            made = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            made = None
        if made is not None and {k: made.get(k) for k in wanted} == wanted:
            return dense.load_index(path), SearchInfo(factory, path=str(path), train_size=size)
    started = time.perf_counter()
    train = index.sample(size, seed) if size and not empty.is_trained else None
    built = dense.build_factory_index(factory, index.manifest.dim, train, index.blocks())
    seconds = time.perf_counter() - started
    dense.save_index(built, path)
    write_json(meta_path, {**wanted, "build_seconds": round(seconds, 3), "bytes": path.stat().st_size})
    return built, SearchInfo(factory, built=True, build_seconds=seconds, path=str(path), train_size=size)


def search_rows(index: ShardedIndex, queries: np.ndarray, k: int = 100, factory: str | None = None,
                nprobe: int | None = None, efsearch: int | None = None, gpu: bool = False,
                train_size: int | None = None, query_batch: int = 4096) -> tuple[np.ndarray, np.ndarray, SearchInfo]:
    """Top-``k`` scores and rows of each query: exact (``factory`` None) or with the factory index."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != index.manifest.dim:
        raise ValueError(f"query embeddings of shape {queries.shape}, the index has dimension {index.manifest.dim}")
    if factory is None:
        if nprobe is not None or efsearch is not None:
            raise ResearchError("--nprobe / --efsearch need --index-factory (exact search has no parameters)")
        started = time.perf_counter()
        scores, rows = exact_top_k(index, queries, k, gpu, query_batch)
        return scores, rows, SearchInfo("exact-gpu" if gpu else "exact", search_seconds=time.perf_counter() - started)
    faiss_index, info = factory_index(index, factory, train_size)
    if gpu:
        faiss_index = dense.to_gpus(faiss_index)
    dense.set_search_parameters(faiss_index, factory, nprobe=nprobe, efSearch=efsearch)
    started = time.perf_counter()
    scores, rows = _batched(faiss_index, queries, k, query_batch)
    info.search_seconds = time.perf_counter() - started
    return scores, rows, info


def to_run(index: ShardedIndex, query_ids: list[str], scores: np.ndarray, rows: np.ndarray) -> Run:
    return {qid: {index.doc_id(int(r)): float(s) for s, r in zip(row_scores, row_ids) if r >= 0}
            for qid, row_scores, row_ids in zip(query_ids, scores, rows)}


def search_index(index: ShardedIndex, query_ids: list[str], queries: np.ndarray, k: int = 100,
                 **options) -> tuple[Run, SearchInfo]:
    """A run (``{qid: {doc_id: score}}``) of the top-``k`` documents of each query; ``options`` as
    :func:`search_rows`."""
    scores, rows, info = search_rows(index, queries, k, **options)
    return to_run(index, query_ids, scores, rows), info
