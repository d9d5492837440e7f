"""Exact inner-product search over document vectors (``faiss.IndexFlatIP``): the one faiss wrapper.

:class:`DenseIndex` holds the vectors (added block by block, read back from faiss without a copy) and searches query
batches; :func:`dense_search` is a whole run from query and document embeddings (``research evaluate``, the
bi-encoder's validation); mining (:mod:`research.retrieval.mining`) searches the index batch by batch.

Over a sharded index (:mod:`research.retrieval.index.search` drives these): :func:`block_top_k` is the exact top-k
of one block of vectors, :func:`merge_top_k` merges two top-k lists exactly (so per-shard results merge into the
corpus top-k), :func:`gpu_flat_index` is one exact index over all GPUs, and :func:`build_factory_index`,
:func:`save_index`, :func:`load_index`, :func:`set_search_parameters` and :func:`to_gpus` handle any faiss index a
factory string names (``IVF4096,Flat``, ``IVF16384,PQ64``, ``HNSW32``), trained on a sample.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from research import progress
from research.data.trec import Run
from research.errors import DataFormatError, ResearchError


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("faiss is missing: install the 'cpu' extra (faiss-cpu) or the 'gpu' extra (faiss-gpu)") from None
    return faiss


class DenseIndex:
    """An exact inner-product index over float32 document vectors; the vectors are read back from faiss (no copy)."""

    def __init__(self, doc_embeddings: np.ndarray | Iterable[np.ndarray], doc_ids: list[str]) -> None:
        """``doc_embeddings``: ``[N, D]``, or an iterable of row blocks (added one by one: no full extra copy)."""
        faiss = _faiss()
        blocks = [doc_embeddings] if isinstance(doc_embeddings, np.ndarray) else doc_embeddings
        self.index = None
        for block in blocks:
            block = np.ascontiguousarray(block, dtype=np.float32)
            if block.ndim != 2:
                raise ValueError(f"document embeddings must be 2-d, got shape {block.shape}")
            if self.index is None:
                self.index = faiss.IndexFlatIP(block.shape[1])
            self.index.add(block)
        if self.index is None or self.index.ntotal != len(doc_ids):
            raise ValueError(f"{len(doc_ids)} document ids but {0 if self.index is None else self.index.ntotal} embeddings")
        self.doc_ids = list(doc_ids)
        self.position = {d: i for i, d in enumerate(self.doc_ids)}
        n, d = self.index.ntotal, self.index.d
        self.vectors = faiss.rev_swig_ptr(self.index.get_xb(), n * d).reshape(n, d)  # a view of faiss' storage

    def __len__(self) -> int:
        return len(self.doc_ids)

    def top_k(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and indices ``[B, k]`` of the top-``k`` documents of each query (index -1 where fewer exist)."""
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(self)))

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        """Indices ``[B, k]`` of the top-``k`` documents of each query (-1 padded)."""
        return self.top_k(queries, k)[1]

    def exact_scores(self, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Float64 inner products of one query with documents ``rows``: the same value whatever the batch."""
        return (self.vectors[rows].astype(np.float64) * query.astype(np.float64)[None, :]).sum(-1)


def dense_search(
    query_embeddings: torch.Tensor, doc_embeddings: torch.Tensor, query_ids: list[str], doc_ids: list[str],
    k: int = 100, query_batch: int = 4096,
) -> Run:
    """Top-``k`` documents by inner product (exact, ``faiss.IndexFlatIP``), searched in query batches."""
    index = DenseIndex(doc_embeddings.detach().float().cpu().numpy(), doc_ids)
    queries = np.ascontiguousarray(query_embeddings.detach().float().cpu().numpy())
    run: Run = {}
    with progress.stage("searching", total=len(query_ids), unit="queries") as step:
        for start in range(0, len(query_ids), query_batch):
            scores, indices = index.top_k(queries[start:start + query_batch], k)
            for qid, row_scores, row_idx in zip(query_ids[start:start + query_batch], scores, indices):
                run[qid] = {doc_ids[i]: float(s) for s, i in zip(row_scores, row_idx) if i >= 0}
            step.advance(len(scores))
    return run


# ---------------------------------------------------------------- sharded search: exact blocks, merges, factories
def block_top_k(queries: np.ndarray, block: np.ndarray, k: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-``k`` of ``queries`` over one block of vectors: scores and global rows (``offset``
    added; -1 where the block has fewer than ``k`` rows), ``[Q, k]`` each."""
    faiss = _faiss()
    scores, rows = faiss.knn(np.ascontiguousarray(queries, dtype=np.float32), np.ascontiguousarray(block, dtype=np.float32),
                             min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
    rows = np.where(rows >= 0, rows + offset, -1)
    if rows.shape[1] < k:
        pad = k - rows.shape[1]
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
    return scores, rows


def merge_top_k(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact top-``k`` of two top-``k`` lists ``(scores, rows)`` of the same queries: by score, then lower row
    (so the merge order of the shards does not matter); missing entries (row -1) last."""
    scores = np.concatenate([a[0], b[0]], axis=1)
    rows = np.concatenate([a[1], b[1]], axis=1)
    scores = np.where(rows >= 0, scores, -np.inf)
    order = np.lexsort((np.where(rows >= 0, rows, np.iinfo(np.int64).max), -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


def has_gpus() -> bool:
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def require_gpus() -> None:
    if not has_gpus():
        raise ResearchError("--gpu: this faiss has no GPU support or sees no GPU (faiss-cpu is installed, or "
                            "CUDA_VISIBLE_DEVICES hides the GPUs); install the 'gpu' extra (faiss-gpu) on a GPU host")


def gpu_flat_index(dim: int, blocks: Iterable[np.ndarray], float16: bool = False):
    """One exact inner-product index sharded over all GPUs, filled block by block (host memory: one block)."""
    faiss = _faiss()
    require_gpus()
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True  # each GPU holds 1/n of the vectors; a search merges their top-k
    options.useFloat16 = float16
    index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(dim), co=options)
    for block in blocks:
        index.add(np.ascontiguousarray(block, dtype=np.float32))
    return index


def to_gpus(index):
    """A CPU faiss index copied to all GPUs (sharded); an index type the GPUs cannot hold is a clear error."""
    faiss = _faiss()
    require_gpus()
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True
    try:
        return faiss.index_cpu_to_all_gpus(index, co=options)
    except RuntimeError as err:
        raise ResearchError(f"--gpu: faiss cannot put this index on the GPU ({' '.join(str(err).split())[:200]})") from None


def new_factory_index(factory: str, dim: int):
    """``faiss.index_factory(dim, factory, inner product)``; an unknown string is a clear error."""
    faiss = _faiss()
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        reason = " ".join(str(err).split()).split("could not parse")[-1][:160]
        raise ResearchError(f"--index-factory {factory!r}: faiss cannot build it ({reason.strip(': ')})") from None


def default_train_size(index, total: int) -> int:
    """Training vectors for an index: none for one that needs no training; else max(100k, 64 per IVF list)."""
    if index.is_trained:
        return 0
    faiss = _faiss()
    try:
        lists = faiss.extract_index_ivf(index).nlist
    except RuntimeError:  # not an IVF index (e.g. plain PQ)
        lists = 0
    return min(total, max(100_000, 64 * lists))


def build_factory_index(factory: str, dim: int, train: np.ndarray | None, blocks: Iterable[np.ndarray]):
    """A factory index trained on ``train`` (when it needs training) and filled block by block."""
    index = new_factory_index(factory, dim)
    if not index.is_trained:
        if train is None or len(train) == 0:
            raise ValueError(f"index {factory!r} needs training vectors")
        try:
            index.train(np.ascontiguousarray(train, dtype=np.float32))
        except RuntimeError as err:  # e.g. fewer training vectors than IVF lists
            reason = " ".join(str(err).split()).split("failed: ")[-1][:200]
            raise ResearchError(f"--index-factory {factory!r}: training failed ({reason})") from None
    for block in blocks:
        index.add(np.ascontiguousarray(block, dtype=np.float32))
    return index


def save_index(index, path) -> None:
    """``faiss.write_index`` to a temporary file renamed into place (never half an index file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        _faiss().write_index(index, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_index(path):
    try:
        return _faiss().read_index(str(path))
    except RuntimeError as err:
        raise DataFormatError(path, None, None, f"not a readable faiss index ({' '.join(str(err).split())[:160]})") from None


def set_search_parameters(index, factory: str, **parameters: float | None) -> None:
    """Set ``nprobe``, ``efSearch``, ... (those not None); one the index does not have is a clear error."""
    faiss = _faiss()
    space = faiss.GpuParameterSpace() if "Gpu" in type(index).__name__ or "Shards" in type(index).__name__ else faiss.ParameterSpace()
    for name, value in parameters.items():
        if value is None:
            continue
        try:
            space.set_index_parameter(index, name, value)
        except RuntimeError:
            raise ResearchError(f"--{name.lower()} does not apply to the index {factory!r}") from None


def index_top_k(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores and rows ``[Q, k]`` from any faiss index (-1 rows where it found fewer)."""
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
