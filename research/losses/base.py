"""The one interface every ranking / embedding loss implements."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RankingLoss(nn.Module):
    """A loss over a score matrix and a target matrix of the same shape.

    ``scores``: ``[queries, candidates]`` model scores (already temperature-scaled by the model, if it has one).
    ``targets``: ``[queries, candidates]`` labels (binary or graded relevance) or teacher scores, as the subclass documents.
    ``mask``: optional ``[queries, candidates]`` bool, True where a candidate takes part.

    The computation runs in float32 with autocast disabled, whatever the caller's precision.
    Losses own no model and no parameters, so one class serves bi-encoders, cross-encoders,
    LLM rerankers and regression students alike.
    """

    def __init__(self, name: str | None = None) -> None:
        super().__init__()
        self.name = name or type(self).__name__

    def forward(self, scores: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
        if scores.shape != targets.shape:
            raise ValueError(f"{self.name}: scores {tuple(scores.shape)} and targets {tuple(targets.shape)} differ in shape")
        if scores.dim() == 1:
            scores, targets = scores.unsqueeze(0), targets.unsqueeze(0)
            mask = None if mask is None else mask.unsqueeze(0)
        if mask is None:
            mask = torch.ones_like(scores, dtype=torch.bool)
        elif mask.shape != scores.shape:
            raise ValueError(f"{self.name}: mask {tuple(mask.shape)} and scores {tuple(scores.shape)} differ in shape")
        device_type = scores.device.type if scores.device.type in ("cuda", "cpu", "xpu", "mps") else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            return self.compute(scores.float(), targets.float(), mask.bool())

    def compute(self, scores: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        """Subclasses: the loss on float32 inputs, ``mask`` always given."""
        raise NotImplementedError

    def terms(self, scores: Tensor, targets: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        """Named parts of the (weighted) loss, for logging; their sum is the training loss."""
        return {self.name: self(scores, targets, mask)}


def masked_log_softmax(scores: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """log-softmax over the unmasked entries (max-shifted by torch); masked entries get -inf."""
    return torch.log_softmax(scores.masked_fill(~mask, float("-inf")), dim=dim)


def safe_log_softmax(scores: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """``masked_log_softmax`` with 0 at masked entries: finite everywhere, so weighting it by zeros stays NaN-free."""
    return torch.where(mask, masked_log_softmax(scores, mask, dim), 0.0)


def masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``values`` where ``valid`` (no host sync); a zero still in the autograd graph when nothing is valid."""
    return torch.where(valid, values, 0.0).sum() / valid.sum().clamp(min=1)
