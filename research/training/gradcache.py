"""GradCache: contrastive losses over batches larger than memory (Gao et al., 2021, arXiv:2101.06983).

(a) embed every chunk without a graph, recording the RNG state per chunk; (b) compute the loss on the concatenated
embeddings as leaf tensors and take its gradient w.r.t. them; (c) re-embed each chunk with a graph under the replayed
RNG state and backpropagate the surrogate ``(emb * cached_grad).sum()``. Parameter gradients equal full-batch backprop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves


class RandContext:
    """Snapshot of the CPU and CUDA RNG states; ``with ctx:`` replays them and restores the outer streams on exit."""

    def __init__(self, *inputs: Any) -> None:
        self.cpu_state = torch.get_rng_state()
        devices = {t.get_device() for t in tree_leaves(inputs) if isinstance(t, Tensor) and t.is_cuda}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            devices.add(torch.cuda.current_device())
        self.devices = sorted(devices)
        self.cuda_states = [torch.cuda.get_rng_state(d) for d in self.devices]
        self._fork: AbstractContextManager | None = None

    def __enter__(self) -> RandContext:
        self._fork = torch.random.fork_rng(devices=self.devices)
        self._fork.__enter__()
        torch.set_rng_state(self.cpu_state)
        for device, state in zip(self.devices, self.cuda_states):
            torch.cuda.set_rng_state(state, device)
        return self

    def __exit__(self, *exc: Any) -> None:
        fork, self._fork = self._fork, None
        fork.__exit__(*exc)


def split_batch(batch: Tensor | Mapping[str, Any], chunk_size: int) -> list[Any]:
    """Split a tensor, or a dict of tensors sharing their first dimension (HF tokenizer output), into row chunks."""
    if chunk_size < 1:
        raise ValueError(f"split_batch: chunk_size must be >= 1, got {chunk_size}")
    if isinstance(batch, Tensor):
        return list(batch.split(chunk_size))
    rows = {v.shape[0] for v in batch.values() if isinstance(v, Tensor)}
    if len(rows) != 1:
        raise ValueError(f"split_batch: tensors must share one first dimension, got sizes {sorted(rows)}")
    n = rows.pop()
    return [{k: v[i : i + chunk_size] if isinstance(v, Tensor) else v for k, v in batch.items()} for i in range(0, n, chunk_size)]


class GradCache:
    """One engine for every cached loss: ``step`` runs forward and backward over chunks and returns the detached loss."""

    def __init__(self, chunk_size: int) -> None:
        if chunk_size < 1:
            raise ValueError(f"GradCache: chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = chunk_size

    def chunks(self, inputs: Any) -> list[Any]:
        """A list/tuple is taken as pre-chunked; a tensor or dict of tensors is split into ``chunk_size`` rows."""
        return list(inputs) if isinstance(inputs, (list, tuple)) else split_batch(inputs, self.chunk_size)

    def step(
        self,
        encoders: Sequence[tuple[Callable[[Any], Tensor], Any]],
        loss_fn: Callable[..., Tensor],
        backward: Callable[[Tensor], Any] = Tensor.backward,
        no_sync: Callable[[], AbstractContextManager] | None = None,
    ) -> Tensor:
        """Forward+backward ``loss_fn(*[cat(encoder(chunk)) per encoder])`` chunk by chunk; returns the detached loss.

        ``backward`` runs once per chunk (pass ``self.manual_backward`` from a LightningModule for precision scaling
        and DeepSpeed); ``no_sync`` (e.g. ``ddp_model.no_sync``) wraps every chunk's forward+backward but the last,
        so DDP all-reduces the accumulated gradients once. The loss graph itself (``loss_fn``'s own parameters, such
        as a learnable temperature, and any ``gather_with_grad`` inside) is backpropagated with the last chunk.
        """
        jobs = [(encode, self.chunks(inputs)) for encode, inputs in encoders]
        work: list[tuple[Callable[[Any], Tensor], Any, RandContext, int, int]] = []  # encoder, chunk, rng, which, rows
        leaves: list[Tensor] = []
        with torch.no_grad():
            for which, (encode, chunks) in enumerate(jobs):
                embs = []
                for chunk in chunks:
                    rng = RandContext(chunk)
                    embs.append(encode(chunk))
                    work.append((encode, chunk, rng, which, embs[-1].shape[0]))
                leaves.append(torch.cat(embs).detach().requires_grad_())
        with torch.enable_grad():
            loss = loss_fn(*leaves)
        if not loss.requires_grad:
            raise ValueError("GradCache: loss_fn returned a loss that does not depend on the embeddings")
        grads = torch.autograd.grad(loss, leaves, retain_graph=True, allow_unused=True)
        grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)]
        starts = [0] * len(leaves)
        for k, (encode, chunk, rng, which, rows) in enumerate(work):
            last = k == len(work) - 1
            with nullcontext() if last or no_sync is None else no_sync():
                with rng:
                    emb = encode(chunk)
                if emb.shape[0] != rows:
                    raise RuntimeError(f"GradCache: re-encoding a chunk gave {emb.shape[0]} rows, not {rows}")
                grad = grads[which][starts[which] : starts[which] + rows]
                surrogate = (emb * grad.to(emb.dtype)).sum()
                backward(surrogate + loss if last else surrogate)
            starts[which] += rows
        return loss.detach()
