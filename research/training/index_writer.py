"""The Lightning prediction writer of ``research index``: each rank writes the shards it encoded, atomically.

:class:`ShardWriter` fixes every rank's share of the missing shards at ``setup`` (then a barrier, so no rank
writes before all have planned), takes each predicted batch into a
:class:`research.retrieval.index.encode.ShardBuffer` (which writes a shard once its last row is in) and waits for
every rank at the end. Nothing is kept per batch beyond the open shard: run ``trainer.predict(...,
return_predictions=False)``.
"""

from __future__ import annotations

import time

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from research import progress
from research.retrieval.index.encode import ShardBatches, ShardBuffer


class ShardWriter(BasePredictionWriter):
    def __init__(self, dataset: ShardBatches) -> None:
        super().__init__(write_interval="batch")
        self.dataset = dataset
        self.buffer = ShardBuffer(dataset.directory, dataset.manifest)
        self.texts = 0
        self.seconds = 0.0
        self._step = None
        self._stage = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # in setup, not on_predict_start: the prediction loop fetches its first batch before that hook
        self.dataset.prepare(trainer.global_rank, trainer.world_size)
        trainer.strategy.barrier("shard plan")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        shards = self.dataset.shards or []
        self._started = time.perf_counter()
        total = sum(self.dataset.manifest.shard_rows(s)[1] for s in shards)
        self._stage = progress.stage(f"encoding shards (rank {trainer.global_rank})" if trainer.world_size > 1
                                     else "encoding shards", total=total, unit="texts")
        self._step = self._stage.__enter__()

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        self.buffer.add(batch, prediction)
        self.texts += len(batch)
        if self._step is not None:
            self._step.advance(len(batch))

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._stage is not None:
            self._stage.__exit__(None, None, None)
            self._stage = self._step = None
        self.seconds = time.perf_counter() - self._started
        trainer.strategy.barrier("shards written")
