"""Batched inference in length order: the one loop that embeds or scores many texts with little padding."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from research import progress


def in_length_order(compute: Callable[[list[int]], Tensor], lengths: Sequence[int], batch_size: int,
                    *row_shape: int, label: str = "scoring pairs", unit: str = "pairs") -> Tensor:
    """Float32 CPU rows ``[len(lengths), *row_shape]`` in input order, ``compute(indices)`` giving the rows of a batch.

    Batches take the longest items first, so that each batch pads to texts of about its own length; equal lengths keep
    their input order, so the batches (and any batch-dependent numerics) are the same from run to run. The loop is a
    :func:`research.progress.stage` named ``label``, counting ``unit``.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)
    out = torch.empty(len(lengths), *row_shape)
    with progress.stage(label, total=len(order), unit=unit) as step:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            out[idx] = compute(idx).float().cpu()
            step.advance(len(idx))
    return out


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode for the block (no dropout while scoring), its training flag restored after."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
