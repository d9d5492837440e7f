"""Pooling of token states into one vector per text."""

from __future__ import annotations

import torch
from torch import Tensor


class Pooling:
    """Turns ``hidden [B, T, H]`` and ``attention_mask [B, T]`` into ``[B, H]``."""

    name: str
    sentence_transformers_mode: str  # the legacy boolean key of sentence-transformers' 1_Pooling/config.json
    sentence_transformers_name: str  # its ``pooling_mode`` value

    def __call__(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        raise NotImplementedError


class MeanPooling(Pooling):
    name, sentence_transformers_mode, sentence_transformers_name = "mean", "pooling_mode_mean_tokens", "mean"

    def __call__(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class CLSPooling(Pooling):
    name, sentence_transformers_mode, sentence_transformers_name = "cls", "pooling_mode_cls_token", "cls"

    def __call__(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        return hidden[:, 0]


class LastTokenPooling(Pooling):
    """The state of the last non-padding token; handles left and right padding."""

    name, sentence_transformers_mode, sentence_transformers_name = "last", "pooling_mode_lasttoken", "lasttoken"

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


# sentence-transformers' legacy boolean keys and the mode each one names (sentence_transformers.models.Pooling)
_ST_LEGACY_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
                    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                    "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


def pooling_from_sentence_transformers(flags: dict, source: str) -> str:
    """Our pooling name for a sentence-transformers ``1_Pooling/config.json`` (``source``, named in errors): its
    ``pooling_mode`` (a name or a list) or, in older files, its ``pooling_mode_*`` flags. Modes we do not implement,
    several at once (sentence-transformers concatenates them) or none are refused: pooling them another way would give
    other embeddings than the model was trained for."""
    if "pooling_mode" in flags:
        mode = flags["pooling_mode"]
        modes = [mode] if isinstance(mode, str) else list(mode) if isinstance(mode, list) else [repr(mode)]
    else:
        modes = [_ST_LEGACY_MODES.get(key, key) for key, on in flags.items() if key.startswith("pooling_mode_") and on]
    ours = {p.sentence_transformers_name: p.name for p in POOLINGS.values()}
    if len(modes) == 1 and modes[0] in ours:
        return ours[modes[0]]
    supported = ", ".join(ours)
    found = ", ".join(map(str, modes)) if modes else "none"
    raise ValueError(f"{source}: pooling mode {found} is not supported (one of {supported}); "
                     "pass pooling= to choose one explicitly")
