"""Exact inner-product search over document vectors (``faiss.IndexFlatIP``): the one faiss wrapper.

:class:`DenseIndex` holds the vectors (added block by block, read back from faiss without a copy) and searches query
batches; :func:`dense_search` is a whole run from query and document embeddings (``research evaluate``, the
bi-encoder's validation); mining (:mod:`research.retrieval.mining`) searches the index batch by batch.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from research.data.trec import Run


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
    for start in range(0, len(query_ids), query_batch):
        scores, indices = index.top_k(queries[start:start + query_batch], k)
        for qid, row_scores, row_idx in zip(query_ids[start:start + query_batch], scores, indices):
            run[qid] = {doc_ids[i]: float(s) for s, i in zip(row_scores, row_idx) if i >= 0}
    return run
