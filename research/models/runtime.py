"""Inference precision for the scoring commands (``research rerank``, ``mine``, ``score``, ``zelo votes``)."""

from __future__ import annotations

import contextlib

PRECISIONS = ("32-true", "bf16-mixed")


def inference_autocast(precision: str, device: str):
    """bfloat16 autocast on ``device`` for ``bf16-mixed``; a no-op context for ``32-true``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose from {', '.join(PRECISIONS)}")
    if precision == "bf16-mixed":
        import torch

        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
