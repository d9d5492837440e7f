"""Ranking losses for cross-encoders and rerankers: pointwise, pairwise and listwise."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from research.losses.base import RankingLoss, masked_mean, safe_log_softmax


class PointwiseBCE(RankingLoss):
    """Pointwise binary cross-entropy on relevance logits, as for monoBERT (Nogueira & Cho, 2019).

    ``targets`` in [0, 1]: binary labels, or graded labels the caller has already normalised (e.g. ``label / max_label``).
    Mean over unmasked entries.
    """

    def compute(self, scores: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        loss = F.binary_cross_entropy_with_logits(scores.masked_fill(~mask, 0.0), targets.masked_fill(~mask, 0.0), reduction="none")
        return masked_mean(loss, mask)


class PointwiseMSE(RankingLoss):
    """Pointwise least-squares regression of scores onto relevance (Fuhr, 1989).

    ``targets`` are the values to regress on: graded labels or teacher scores. Mean over unmasked entries.
    """

    def compute(self, scores: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        return masked_mean((scores - targets).masked_fill(~mask, 0.0).square(), mask)


def _pairs(targets: Tensor, mask: Tensor) -> Tensor:
    """``[Q, C, C]`` bool, True for unmasked pairs ``(i, j)`` with ``targets_i > targets_j``."""
    return (targets.unsqueeze(-1) > targets.unsqueeze(-2)) & mask.unsqueeze(-1) & mask.unsqueeze(-2)


class RankNet(RankingLoss):
    """RankNet pairwise logistic loss (Burges et al., 2005), mean of ``log(1 + exp(s_j - s_i))`` over pairs.

    ``targets`` are graded labels or teacher scores; every unmasked pair with ``targets_i > targets_j`` is one term.
    """

    def compute(self, scores: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        scores = scores.masked_fill(~mask, 0.0)
        return masked_mean(F.softplus(scores.unsqueeze(-2) - scores.unsqueeze(-1)), _pairs(targets, mask))


class ListwiseSoftmaxCE(RankingLoss):
    """Localized contrastive estimation, softmax cross-entropy over a query's candidates (Gao et al., 2021).

    ``targets`` >= 0 are relevance weights, normalised per row into the target distribution (one-hot: the usual single
    positive; binary: the average -log p of the positives); negative targets count as 0. Rows without relevance are skipped.
    """

    def compute(self, scores: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        weights = targets.clamp(min=0.0).masked_fill(~mask, 0.0)
        total = weights.sum(-1)
        per_row = -(weights * safe_log_softmax(scores, mask)).sum(-1) / torch.where(total > 0, total, 1.0)
        return masked_mean(per_row, total > 0)


class ListNet(RankingLoss):
    """ListNet top-one cross-entropy between softmax(targets) and softmax(scores) (Cao et al., 2007).

    ``targets`` are graded labels or teacher scores (softmaxed over the unmasked candidates). Mean over rows with at
    least two unmasked candidates.
    """

    def compute(self, scores: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        target_probs = safe_log_softmax(targets, mask).exp()
        per_row = -torch.where(mask, target_probs * safe_log_softmax(scores, mask), 0.0).sum(-1)
        return masked_mean(per_row, mask.sum(-1) > 1)


class ListMLE(RankingLoss):
    """ListMLE, negative Plackett-Luce log-likelihood of the target ordering (Xia et al., 2008).

    ``targets`` define the ordering (descending; ties by lower column index first); masked candidates are left out of
    the permutation. Sum over positions, mean over rows with at least two unmasked candidates.
    """

    def compute(self, scores: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        order = targets.masked_fill(~mask, float("-inf")).sort(dim=-1, descending=True, stable=True).indices
        valid = mask.gather(-1, order)
        ordered = torch.where(valid, scores.masked_fill(~mask, 0.0).gather(-1, order), float("-inf"))
        tail_logsumexp = torch.logcumsumexp(ordered.flip(-1), -1).flip(-1)  # log sum_{k >= i} exp(s_k), stable
        per_row = torch.where(valid, tail_logsumexp - ordered, 0.0).sum(-1)
        return masked_mean(per_row, mask.sum(-1) > 1)


class LambdaLoss(RankingLoss):
    """LambdaLoss with the NDCG-Loss2++ weighting scheme (Wang et al., 2018), the weights as allRank computes them.

    ``targets`` are graded labels (gain ``2^t - 1``, negatives clamped to 0); discounts use the rank under the current
    scores, over unmasked candidates only. Per query: sum over pairs ``t_i > t_j`` (ranks within ``k``, if given) of
    ``w_ij * ln(1 + exp(-sigma (s_i - s_j)))``, ``w_ij = mu * ndcg2_ij + lambdarank_ij``; mean over queries with a pair.
    Scale: allRank's defaults (``reduction_log="binary"``, ``reduction="sum"``) take ``log2`` and sum over the batch,
    so allRank's value is this loss times ``(queries with a pair) / ln 2``; the gradients differ by that constant only.
    """

    def __init__(self, mu: float = 10.0, sigma: float = 1.0, k: int | None = None, name: str | None = None) -> None:
        super().__init__(name)
        self.mu, self.sigma, self.k = mu, sigma, k

    def compute(self, scores: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        n = scores.shape[-1]
        order = scores.detach().masked_fill(~mask, float("-inf")).sort(dim=-1, descending=True, stable=True).indices
        valid = mask.gather(-1, order)  # unmasked candidates occupy the top ranks
        ranked_scores = scores.masked_fill(~mask, 0.0).gather(-1, order)
        ranked_targets = targets.masked_fill(~mask, 0.0).gather(-1, order)
        gains = torch.where(valid, 2.0 ** ranked_targets.clamp(min=0.0) - 1.0, 0.0)
        rank = torch.arange(1, n + 1, device=scores.device, dtype=scores.dtype)
        discount = torch.log2(1.0 + rank)
        top_k = rank <= (self.k or n)
        ideal_dcg = (gains.sort(-1, descending=True).values / discount * top_k).sum(-1, keepdim=True)
        gains = gains / ideal_dcg.clamp(min=1e-10)
        gain_diff = (gains.unsqueeze(-1) - gains.unsqueeze(-2)).abs()
        distance = (rank.unsqueeze(-1) - rank.unsqueeze(-2)).abs()
        ndcg2 = torch.where(distance > 0, 1.0 / torch.log2(1.0 + distance).clamp(min=1e-10) - 1.0 / torch.log2(2.0 + distance), 0.0)
        lambdarank = (1.0 / discount.unsqueeze(-1) - 1.0 / discount.unsqueeze(-2)).abs()
        weights = (self.mu * ndcg2 + lambdarank) * gain_diff
        pairs = _pairs(ranked_targets, valid) & top_k.unsqueeze(-1) & top_k.unsqueeze(-2)
        loss = weights * F.softplus(-self.sigma * (ranked_scores.unsqueeze(-1) - ranked_scores.unsqueeze(-2)))
        per_row = torch.where(pairs, loss, 0.0).sum((-2, -1))
        return masked_mean(per_row, pairs.flatten(-2).any(-1))
