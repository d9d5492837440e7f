"""Silence the library messages that say nothing about the user's run, each by its exact text; every other warning
stays visible. W&B's "anonymous setting" warning and Lightning's "modules in eval mode" are fixed at their causes
(research.training.tracking, modules.base), not filtered."""

from __future__ import annotations

import logging
import warnings

# Lightning's advertisement for its paid logger, printed by every Trainer (rank_zero_info)
LITLOGGER_TIP = "💡 Tip: For seamless cloud logging"
# torch 2.10 deprecated LeafSpec; Lightning's own _pytree.py still calls it (nothing the user can change)
PYTREE_DEPRECATION = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning_fabric.utilities.rank_zero",
                     "lightning.fabric.utilities.rank_zero")


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


_TIP_FILTER = _DropMessages((LITLOGGER_TIP,))


def silence_library_noise() -> None:
    """Install the filters (idempotent)."""
    warnings.filterwarnings("ignore", message=PYTREE_DEPRECATION)
    for name in RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if _TIP_FILTER not in logger.filters:
            logger.addFilter(_TIP_FILTER)

