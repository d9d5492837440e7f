"""Pooling of token states into one vector per text."""

from __future__ import annotations

import torch
from torch import Tensor


class Pooling:
    """Turns ``hidden [B, T, H]`` and ``attention_mask [B, T]`` into ``[B, H]``."""

    name: str
    sentence_transformers_mode: str

    def __call__(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        raise NotImplementedError


class MeanPooling(Pooling):
    name, sentence_transformers_mode = "mean", "pooling_mode_mean_tokens"

    def __call__(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class CLSPooling(Pooling):
    name, sentence_transformers_mode = "cls", "pooling_mode_cls_token"

    def __call__(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        return hidden[:, 0]


class LastTokenPooling(Pooling):
    """The state of the last non-padding token; handles left and right padding."""

    name, sentence_transformers_mode = "last", "pooling_mode_lasttoken"

    def __call__(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        if bool(attention_mask[:, -1].all()):  # left padding, or no padding at all
            return hidden[:, -1]
        last = attention_mask.long().sum(1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


POOLINGS: dict[str, type[Pooling]] = {cls.name: cls for cls in (MeanPooling, CLSPooling, LastTokenPooling)}


def pooling_from_name(name: str) -> Pooling:
    try:
        return POOLINGS[name]()
    except KeyError:
        raise ValueError(f"unknown pooling '{name}': choose one of {', '.join(POOLINGS)}") from None
