"""Loss library: one small class per objective, one signature ``loss(scores, targets, mask=None)``."""

from research.losses.base import RankingLoss
from research.losses.combined import CombinedLoss
from research.losses.contrastive import (
    GISTEmbedLoss,
    InfoNCE,
    SymmetricInfoNCE,
    TripletLoss,
    in_batch_targets,
)
from research.losses.distillation import KLDistillation, MarginMSE
from research.losses.ranking import (
    LambdaLoss,
    ListMLE,
    ListNet,
    ListwiseSoftmaxCE,
    PointwiseBCE,
    PointwiseMSE,
    RankNet,
)

__all__ = [
    "RankingLoss",
    "CombinedLoss",
    "InfoNCE",
    "SymmetricInfoNCE",
    "GISTEmbedLoss",
    "TripletLoss",
    "in_batch_targets",
    "MarginMSE",
    "KLDistillation",
    "PointwiseBCE",
    "PointwiseMSE",
    "RankNet",
    "ListwiseSoftmaxCE",
    "ListNet",
    "ListMLE",
    "LambdaLoss",
]
