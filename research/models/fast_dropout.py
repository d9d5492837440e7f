"""Dropout with cheap masks: bits of full-range 64-bit random words compared in int16 lanes.

On CPU, ``bernoulli_`` draws one Mersenne-Twister sample per element; four int16 lanes of one ``random_`` word are
about 3x cheaper. The keep mask comes from torch's default generator, so ``seed_everything``, RNG forking
(GradCache) and activation checkpointing replay it as they replay ``nn.Dropout``.

:func:`use_fast_dropout` puts it into a Hugging Face model: every ``nn.Dropout`` becomes :class:`FastDropout`, and
models on transformers' ``sdpa`` attention switch to :func:`sdpa_fast_dropout_attention` (math attention with fast
dropout on the probabilities while training; transformers' own sdpa function otherwise).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

ATTENTION_NAME = "sdpa_fast_dropout"
_LANES = 4  # int16 lanes per int64 word


def _check_p(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str | None = None) -> Tensor:
    """Boolean mask, True with probability ``1 - p`` (p quantised to 1/65536), from the default generator."""
    _check_p(p)
    n = math.prod(shape)
    words = torch.empty(-(-n // _LANES), dtype=torch.int64, device=device).random_(-2**63, None)
    threshold = min(round(p * 65536), 65535) - 32768  # p == 1 is handled by the callers
    return (words.view(torch.int16)[:n] >= threshold).view(shape)


def fast_dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Inverted dropout like ``F.dropout``: kept values scaled by ``1 / (1 - p)``, mask from :func:`keep_mask`."""
    _check_p(p)
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return x * 0.0
    # scale as a Python scalar after the mask product: in bf16 a pre-scaled mask would round 1 / (1 - p)
    return (x * keep_mask(x.shape, p, x.device).to(x.dtype)).mul_(1.0 / (1.0 - p))


class FastDropout(nn.Module):
    """``nn.Dropout(p)`` with masks from int16 lanes of 64-bit random words; p is quantised to 1/65536."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        _check_p(p)
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return fast_dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def sdpa_fast_dropout_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers attention function: its sdpa without dropout, else math attention with :func:`fast_dropout`."""
    from transformers.integrations.sdpa_attention import (
        repeat_kv,
        sdpa_attention_forward,
    )

    unsupported = any(kwargs.get(k) is not None for k in ("position_bias", "cache", "softcap"))
    if dropout == 0.0 or unsupported:  # unsupported features: transformers' sdpa with torch's own dropout
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    q_length, kv_length = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is None and causal and q_length > 1:  # sdpa's is_causal: top-left aligned lower triangle
        attention_mask = torch.ones(q_length, kv_length, dtype=torch.bool, device=query.device).tril()
    scores = (query @ key.transpose(-2, -1)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    elif attention_mask is not None:
        scores = scores + attention_mask
    probs = fast_dropout(scores.softmax(-1), dropout, training=True)
    return (probs @ value).transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    """Register :func:`sdpa_fast_dropout_attention` and sdpa's mask format under :data:`ATTENTION_NAME` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, sdpa_fast_dropout_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def use_fast_dropout(model: nn.Module) -> nn.Module:
    """In place: every ``nn.Dropout`` becomes :class:`FastDropout`, sdpa models use the fast-dropout attention."""
    # the attention setting lives in memory only: save_pretrained writes no attention implementation to config.json
    from transformers import PreTrainedModel

    _register_attention()
    for module in list(model.modules()):
        if isinstance(module, PreTrainedModel) and module.config._attn_implementation == "sdpa":
            module.set_attn_implementation(ATTENTION_NAME)  # also switches sub-models sharing or nested in it
        for name, child in list(module.named_children()):
            if type(child) is nn.Dropout:
                setattr(module, name, FastDropout(child.p).train(child.training))
    return model
