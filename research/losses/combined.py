"""A weighted sum of losses that share one ``(scores, targets, mask)`` call."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from research.losses.base import RankingLoss


class CombinedLoss(RankingLoss):
    """Weighted sum of ranking losses, e.g. ``InfoNCE`` + ``MarginMSE``; every component gets the same inputs.

    ``terms()`` logs each weighted component under its loss name (repeated names get ``_2``, ``_3``, ...).
    """

    def __init__(self, losses: list[RankingLoss], weights: list[float], name: str | None = None) -> None:
        super().__init__(name)
        if not losses or len(losses) != len(weights):
            raise ValueError(f"{self.name}: needs one weight per loss, got {len(losses)} losses and {len(weights)} weights")
        self.losses = nn.ModuleList(losses)
        self.weights = [float(weight) for weight in weights]
        self.term_names: list[str] = []
        for loss in losses:
            term, count = loss.name, 1
            while term in self.term_names:
                count += 1
                term = f"{loss.name}_{count}"
            self.term_names.append(term)

    def terms(self, scores: Tensor, targets: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        return {term: weight * loss(scores, targets, mask) for term, loss, weight in zip(self.term_names, self.losses, self.weights)}

    def forward(self, scores: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
        return torch.stack(list(self.terms(scores, targets, mask).values())).sum()
