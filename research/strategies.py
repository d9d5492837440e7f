"""The class path ``research.strategies.FullyShardStrategy`` that configs saved before the layered layout name;
the strategy lives in :mod:`research.training.strategies`."""

from research.training.strategies import FullyShardStrategy

__all__ = ["FullyShardStrategy"]
