"""Cross-device negatives: gather embeddings from every rank with gradients flowing back to their owner.

Loss convention (exact, tested): each rank scores its LOCAL queries against ALL gathered documents and takes the
mean over its local queries; DDP then averages parameter gradients over the W ranks. With equal local batch sizes
that average is the gradient of the mean loss over the global batch, i.e. what one process on the concatenated batch
computes; with unequal sizes multiply the local loss by ``GatheredGroups.loss_scale`` (W * B_r / N) to keep it exact.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def is_distributed() -> bool:
    """True when a default process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Ranks in the default process group (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank in the default process group (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def close_process_group() -> None:
    """Destroy the default process group, if one is running, while the interpreter is still whole.

    Lightning registers this at exit for NCCL only; a gloo group left to interpreter finalization can abort a rank
    with SIGABRT after its work is done (pytorch/pytorch#179291), which turns a finished CPU DDP run into a failure.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _all_ints(values: list[int], device: torch.device | str | None) -> list[list[int]]:
    """Every rank's ``values`` in rank order (one collective)."""
    if not is_distributed():
        return [values]
    mine = torch.tensor(values, dtype=torch.long, device=device)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [o.tolist() for o in out]


def all_sizes(n: int, device: torch.device | str | None = None) -> list[int]:
    """Every rank's ``n`` in rank order (a collective: all ranks must call it)."""
    return [v[0] for v in _all_ints([n], device)]


def _all_gather_rows(t: Tensor, sizes: Sequence[int]) -> Tensor:
    """all_gather along dim 0 when rank r holds ``sizes[r]`` rows (padded to the longest for the collective)."""
    longest = max(sizes)
    padded = F.pad(t, (0, 0) * (t.dim() - 1) + (0, longest - t.shape[0])).contiguous()
    buffers = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(buffers, padded)
    return torch.cat([b[:n] for b, n in zip(buffers, sizes)])


def all_gather_rows(t: Tensor, sizes: Sequence[int] | None = None) -> Tensor:
    """``t`` from every rank concatenated along dim 0 in rank order, WITHOUT gradient (ids, labels); ``t`` when not
    distributed. ``sizes`` (every rank's row count) saves one collective when already known."""
    if not is_distributed():
        return t
    return _all_gather_rows(t, list(sizes) if sizes is not None else all_sizes(t.shape[0], t.device))


def id_hashes(ids: Sequence[str], device: torch.device | str | None = None) -> Tensor:
    """Stable signed 64-bit hashes of string ids (blake2b, equal in every process, unlike ``hash``), as ``[len(ids)]``
    int64: a tensor that collectives can gather, so ids can be compared across ranks (collision odds ~ n^2 / 2^64)."""
    values = [int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little", signed=True) for i in ids]
    return torch.tensor(values, dtype=torch.long, device=device)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 (sizes may differ per rank); backward SUMs the gradient over ranks and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, t: Tensor, sizes: list[int]) -> Tensor:
        r = dist.get_rank()
        ctx.start, ctx.size = sum(sizes[:r]), sizes[r]
        return _all_gather_rows(t, sizes)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        # SUM, not mean: rank r's rows enter the loss of every rank s, so d(sum_s L_s)/dx_r = sum_s dL_s/dgathered_s[r];
        # DDP's division by W then turns that into d((1/W) sum_s L_s)/dθ, the single-process gradient of the global mean.
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.start + ctx.size], None


def gather_with_grad(t: Tensor) -> Tensor:
    """``t`` from every rank concatenated along dim 0 in rank order, differentiable; ``t`` itself when not distributed."""
    if not is_distributed():
        return t
    return _GatherWithGrad.apply(t, all_sizes(t.shape[0], t.device))


@dataclass(frozen=True)
class GatheredGroups:
    """This rank's query embeddings and every rank's document embeddings (gathered with gradient), with each local
    query's positive column and where this rank's rows sit in the gathered order. Embeddings, not texts: the data
    batch they come from is a :class:`research.data.batches.GroupBatch`."""

    queries: Tensor  # [B, D] this rank's queries
    docs: Tensor  # [M, D] all ranks' documents in rank order, each query's group (positive first) contiguous
    positives: Tensor  # [B] long: column of local query i's positive in ``docs``
    all_queries: Tensor | None  # [N, D] all ranks' queries (with gradient) when requested, else None
    query_offset: int  # global row of local query 0
    doc_offset: int  # global column of this rank's first document
    query_sizes: tuple[int, ...]  # every rank's number of queries
    doc_sizes: tuple[int, ...] = ()  # every rank's number of documents (for gathering per-document ids alongside)

    def targets(self) -> Tensor:
        """One-hot ``[B, M]`` targets marking each local query's positive, for ``RankingLoss(scores, targets)``."""
        targets = torch.zeros(self.queries.shape[0], self.docs.shape[0], device=self.docs.device)
        return targets.scatter_(1, self.positives[:, None], 1.0)

    @property
    def loss_scale(self) -> float:
        """W * B_r / N: multiply the local mean loss by it so DDP's average is the global mean even for unequal B_r."""
        return len(self.query_sizes) * self.query_sizes[rank()] / sum(self.query_sizes)


def gather_group_batch(query_emb: Tensor, doc_emb: Tensor, gather_queries: bool = False) -> GatheredGroups:
    """Gather documents ``[B*(1+n), D]`` (query i's positive at row i*(1+n), its n hard negatives right after) from all ranks."""
    b, m = query_emb.shape[0], doc_emb.shape[0]
    if b == 0 or m % b:
        raise ValueError(f"gather_group_batch: {m} documents are not a whole number of groups for {b} queries")
    q_sizes, d_sizes = map(list, zip(*_all_ints([b, m], doc_emb.device)))
    r, gather = rank(), is_distributed()
    doc_offset = sum(d_sizes[:r])
    return GatheredGroups(
        queries=query_emb,
        docs=_GatherWithGrad.apply(doc_emb, d_sizes) if gather else doc_emb,
        positives=doc_offset + torch.arange(b, device=doc_emb.device) * (m // b),
        all_queries=(_GatherWithGrad.apply(query_emb, q_sizes) if gather else query_emb) if gather_queries else None,
        query_offset=sum(q_sizes[:r]),
        doc_offset=doc_offset,
        query_sizes=tuple(q_sizes),
        doc_sizes=tuple(d_sizes),
    )
