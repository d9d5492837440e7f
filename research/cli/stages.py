"""Lightning's test batches as :mod:`research.progress` stages, in place of its ``Testing 0/316`` bar: ``encoding
queries`` and ``encoding documents`` for a bi-encoder's encode batches, ``scoring pairs`` for pair batches, else
``testing`` batches. What the module reports itself is left to it: its epoch end (search, metrics), and the corpus
when it encodes it itself (``corpus_in_eval_batches`` False; the DataModule then sends no document batches)."""

from __future__ import annotations

import contextlib
from typing import Any

import lightning as L

from research import progress


def batch_stage(batch: Any) -> tuple[str, str, int]:
    """(stage label, unit, count) of one evaluation batch."""
    if hasattr(batch, "is_query") and hasattr(batch, "texts"):  # research.data.batches.EncodeBatch
        return ("encoding queries" if batch.is_query else "encoding documents"), "texts", len(batch.texts)
    if hasattr(batch, "query_ids") and hasattr(batch, "doc_ids") and hasattr(batch, "documents"):  # PairBatch
        return "scoring pairs", "pairs", len(batch.doc_ids)
    return "testing", "batches", 1


def stage_totals(loaders: Any) -> dict[str, int]:
    """Each stage's total over the loaders' batches, where the dataset lists them (else batches per loader)."""
    totals: dict[str, int] = {}
    for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
        batches = getattr(getattr(loader, "dataset", None), "batches", None)
        if isinstance(batches, list):
            for batch in batches:
                label, _, count = batch_stage(batch)
                totals[label] = totals.get(label, 0) + count
        elif hasattr(loader, "__len__"):
            totals["testing"] = totals.get("testing", 0) + len(loader)
    return totals


class EvaluationProgress(L.Callback):
    """Reports a test loop's batches as stages (one stage per kind of batch, in the order they come)."""

    def __init__(self) -> None:
        self._open = contextlib.ExitStack()
        self._label: str | None = None
        self._stage: progress.Stage | None = None
        self._totals: dict[str, int] = {}
        self._count = 0

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._totals = stage_totals(trainer.test_dataloaders)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        label, unit, self._count = batch_stage(batch)
        if label != self._label:
            self._close()
            self._label = label
            self._stage = self._open.enter_context(progress.stage(label, self._totals.get(label), unit))

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._stage is not None:
            self._stage.advance(self._count)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()  # before the module's own epoch end, which searches and scores

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._open.__exit__(type(exception), exception, exception.__traceback__)
        self._open, self._label, self._stage = contextlib.ExitStack(), None, None

    def _close(self) -> None:
        self._open.close()
        self._open, self._label, self._stage = contextlib.ExitStack(), None, None
