"""Where and in what precision models run: the device ``auto`` means, the dtype the hardware computes natively, and
inference autocast for the scoring commands (``research rerank``, ``mine``, ``score``, ``zelo votes``).

torch is imported inside the functions: the CLI imports this module to build its parser, and ``research --help``
should not pay for loading torch.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PRECISIONS = ("32-true", "bf16-mixed")


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; any other name (``cpu``, ``cuda:1``, ...) unchanged."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def inference_autocast(precision: str, device: str):
    """bfloat16 autocast on ``device`` for ``bf16-mixed``; a no-op context for ``32-true``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose from {', '.join(PRECISIONS)}")
    if precision == "bf16-mixed":
        import torch

        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def preferred_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """bfloat16 where the hardware computes it natively (CUDA with bf16, CPUs with AVX512-BF16 / AMX), else float32."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    try:
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    except (AttributeError, RuntimeError):
        return torch.float32
