"""Contrastive losses for embedding models."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from research.losses.base import RankingLoss, masked_mean, safe_log_softmax


def in_batch_targets(num_queries: int, docs_per_query: int, device: torch.device | str | None = None) -> Tensor:
    """Targets for the in-batch layout ``[Q, Q * docs_per_query]``: query ``i``'s positive is column ``i * docs_per_query``."""
    targets = torch.zeros(num_queries, num_queries * docs_per_query, device=device)
    targets[torch.arange(num_queries), torch.arange(num_queries) * docs_per_query] = 1.0
    return targets


def info_nce(scores: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Mean over rows with a positive of the average ``-log softmax`` of that row's positives."""
    positive = (targets > 0) & mask
    per_row = -(safe_log_softmax(scores, mask) * positive).sum(-1) / positive.sum(-1).clamp(min=1)
    return masked_mean(per_row, positive.any(-1))


class InfoNCE(RankingLoss):
    """InfoNCE / multiple-negatives ranking loss with in-batch and hard negatives (van den Oord et al., 2018; Henderson et al., 2017).

    ``targets`` > 0 marks a query's positive(s); with several, the loss averages -log p over them.
    Every other unmasked candidate is a negative. Rows without a positive are skipped.
    """

    def compute(self, scores: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        return info_nce(scores, targets, mask)


class SymmetricInfoNCE(RankingLoss):
    """Bidirectional InfoNCE, query->document plus document->query, as in CLIP (Radford et al., 2021).

    ``targets`` > 0 marks positives, e.g. column ``i * (1 + n)`` of row ``i`` for the in-batch matrix ``[B, B * (1 + n)]``
    (see ``in_batch_targets``). Result: (InfoNCE over rows + InfoNCE over the columns holding a positive, each a softmax
    over the unmasked queries of that column) / 2; hard-negative columns take part only in the query->document half.
    """

    def compute(self, scores: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        return (info_nce(scores, targets, mask) + info_nce(scores.T, targets.T, mask.T)) / 2


class GISTEmbedLoss(RankingLoss):
    """InfoNCE with guided in-batch negative selection, GISTEmbed (Solatorio, 2024).

    ``targets`` > 0 marks positives; a non-positive candidate is dropped when ``guide_scores`` (a guide model's scores,
    same shape, no gradient) puts it above the row's lowest-scored positive minus ``margin`` (a likely false negative).
    ``modules.BiEncoderModule(guide_model=...)`` builds the candidates and the guide's scores of them.
    """

    def __init__(self, margin: float = 0.0, name: str | None = None) -> None:
        super().__init__(name)
        self.margin = margin

    def guide_mask(self, guide_scores: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
        """``mask`` minus the candidates the guide scores above ``min(positive guide score) - margin``."""
        mask = torch.ones_like(targets, dtype=torch.bool) if mask is None else mask.bool()
        positive = (targets > 0) & mask
        guide_scores = guide_scores.detach().float()
        threshold = guide_scores.masked_fill(~positive, float("inf")).amin(-1, keepdim=True) - self.margin
        return mask & (positive | (guide_scores <= threshold))

    def forward(self, scores: Tensor, targets: Tensor, mask: Tensor | None = None, *, guide_scores: Tensor) -> Tensor:
        if guide_scores.shape != scores.shape:
            raise ValueError(f"{self.name}: guide_scores {tuple(guide_scores.shape)} and scores {tuple(scores.shape)} differ in shape")
        if mask is not None and mask.shape != scores.shape:
            raise ValueError(f"{self.name}: mask {tuple(mask.shape)} and scores {tuple(scores.shape)} differ in shape")
        return super().forward(scores, targets, self.guide_mask(guide_scores, targets, mask))

    def terms(self, scores: Tensor, targets: Tensor, mask: Tensor | None = None, *, guide_scores: Tensor) -> dict[str, Tensor]:
        return {self.name: self(scores, targets, mask, guide_scores=guide_scores)}

    def compute(self, scores: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        return info_nce(scores, targets, mask)


class TripletLoss(RankingLoss):
    """Triplet margin loss (Schroff et al., 2015), mean of ``relu(margin - s_pos + s_neg)`` over (positive, negative) pairs.

    ``targets`` > 0 marks positives, every other unmasked candidate of the row is a negative. Scores are similarities
    (cosine, dot product, or negative euclidean distance: the model's choice), so ``margin`` is in score units.
    """

    def __init__(self, margin: float = 1.0, name: str | None = None) -> None:
        super().__init__(name)
        self.margin = margin

    def compute(self, scores: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        scores = scores.masked_fill(~mask, 0.0)
        positive, negative = (targets > 0) & mask, (targets <= 0) & mask
        k = int(positive.sum(-1).max().clamp(min=1))  # most positives in a row; gather them to avoid a [Q, C, C] tensor
        is_pos, pos_idx = positive.float().topk(k, dim=-1)
        hinge = F.relu(self.margin - scores.gather(-1, pos_idx).unsqueeze(-1) + scores.unsqueeze(-2))
        return masked_mean(hinge, is_pos.bool().unsqueeze(-1) & negative.unsqueeze(-2))
