"""LightningDataModules and the data formats they read."""

from datamodules.reranking import (
    CandidateGroupsDataModule,
    ListwiseDataModule,
    PairwiseDataModule,
    PointwiseDataModule,
    RerankingDataModule,
)
from datamodules.retrieval import RetrievalDataModule

__all__ = [
    "RetrievalDataModule", "RerankingDataModule", "ListwiseDataModule", "PairwiseDataModule", "PointwiseDataModule",
    "CandidateGroupsDataModule",
]
