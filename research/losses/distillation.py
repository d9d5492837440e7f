"""Distillation losses: a student's scores against a teacher's."""

from __future__ import annotations

import torch
from torch import Tensor

from research.losses.base import RankingLoss, masked_mean, safe_log_softmax


class MarginMSE(RankingLoss):
    """Margin-MSE distillation (Hofstätter et al., 2020), MSE between student and teacher margins ``s_pos - s_neg``.

    ``targets`` are teacher scores. Column 0 is the positive by convention; every other unmasked column is a negative
    and gives one term ``((s_0 - s_j) - (t_0 - t_j))^2``; mean over all terms. Rows whose column 0 is masked are skipped.
    """

    def compute(self, scores: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        scores, targets = scores.masked_fill(~mask, 0.0), targets.masked_fill(~mask, 0.0)
        error = (scores[:, :1] - scores) - (targets[:, :1] - targets)
        negative = mask & mask[:, :1]
        negative[:, 0] = False
        return masked_mean(error.square(), negative)


class KLDistillation(RankingLoss):
    """Listwise ``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` distillation (Hinton et al., 2015).

    ``targets`` are teacher scores; both softmaxes run over the unmasked candidates. Mean over rows with at least
    two unmasked candidates (the KL of a single candidate is 0). The factor ``T^2`` is Hinton et al.'s (sec. 2): the
    gradient of the softened KL shrinks as ``1 / T^2``, so without it a higher temperature would silently scale the
    loss (and its weight against other terms) down; at ``T = 1`` the factor is 1.
    """

    def __init__(self, temperature: float = 1.0, name: str | None = None) -> None:
        super().__init__(name)
        self.temperature = temperature

    def compute(self, scores: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        log_student = safe_log_softmax(scores / self.temperature, mask)
        log_teacher = safe_log_softmax(targets / self.temperature, mask)
        per_row = torch.where(mask, log_teacher.exp() * (log_teacher - log_student), 0.0).sum(-1)
        return self.temperature ** 2 * masked_mean(per_row, mask.sum(-1) > 1)
