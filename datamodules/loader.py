"""A DataLoader whose position within an epoch survives a checkpoint (docs/reliability.md).

A resumed run skips the batches it already trained on (without loading them) instead of replaying the epoch.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader


class _SkipFirst:
    """An index (batch) sampler whose first iteration leaves out its first ``skip`` batches; later iterations (the
    next epochs, with persistent workers) are whole."""

    def __init__(self, sampler: Any, skip: int) -> None:
        self.sampler, self.pending, self.active = sampler, skip, skip

    def __iter__(self) -> Iterator[Any]:
        # a generator: the skip is used by the first iteration that draws (torch's multiprocessing iterator calls
        # iter() twice and keeps the second)
        skip, self.pending = self.pending, 0
        self.active = skip
        yield from itertools.islice(iter(self.sampler), skip, None)

    def __len__(self) -> int:
        return len(self.sampler) - self.active


class _LazyIterator:
    """Starts the DataLoader's iterator at the first ``next()``: after Lightning's ``set_epoch`` and after a resumed
    position was loaded (workers would otherwise prefetch indices of the wrong epoch when ``iter()`` is called)."""

    def __init__(self, loader: ResumableDataLoader) -> None:
        self._loader, self._iterator = loader, None

    def __iter__(self) -> _LazyIterator:
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            self._iterator = self._loader._start()
        batch = next(self._iterator)
        self._loader._position += 1
        return batch

    def __len__(self) -> int:
        return len(self._loader) if self._iterator is None else len(self._iterator)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose position within the epoch is saved in Lightning checkpoints.

    A plain ``DataLoader`` is not stateful: a run resumed from a mid-epoch checkpoint replays the epoch from its first
    batch (Lightning warns "your dataloader is not resumable"), so it trains on other batches than the uninterrupted
    run. This loader counts the batches it handed out in the current epoch (``state_dict``, which Lightning stores in
    every checkpoint); after ``load_state_dict`` the next iteration leaves them out at the index level (no dataset
    access), if it is the same epoch. The order must be a function of the epoch (``EpochShuffleSampler``).

    Lightning 2.6 calls ``load_state_dict`` only if the train loader was not built earlier (``configure_optimizers``
    reading ``trainer.estimated_stepping_batches`` builds it before the checkpoint is restored), so
    :class:`research.training.callbacks.ExactResume` hands the saved position over again at ``on_train_start``; the iterator
    starts at the first batch, so either way the position is in place before any index is drawn.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._position = 0
        self._resume: tuple[int | None, int] | None = None
        self._skip: int | None = None

    def _sampler_epoch(self) -> int | None:
        for sampler in (self.sampler, getattr(self.batch_sampler, "sampler", None)):
            epoch = getattr(sampler, "epoch", None)
            if isinstance(epoch, int):
                return epoch
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._sampler_epoch(), "batches": self._position}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        batches = int(state_dict.get("batches", 0))
        self._resume = (state_dict.get("epoch"), batches) if batches > 0 else None

    @property
    def _index_sampler(self) -> Any:
        sampler = DataLoader._index_sampler.fget(self)
        return sampler if self._skip is None else _SkipFirst(sampler, self._skip)

    def __iter__(self) -> _LazyIterator:
        self._position = 0
        return _LazyIterator(self)

    def _start(self) -> Iterator[Any]:
        """The real iterator, without the batches a resumed epoch already trained on."""
        resume, self._resume = self._resume, None
        skip = 0
        if resume is not None:
            epoch, batches = resume
            current = self._sampler_epoch()
            same_epoch = epoch == current if epoch is not None and current is not None else batches < len(self)
            skip = min(batches, len(self)) if same_epoch else 0
        self._skip = skip or None
        try:
            iterator = super().__iter__()
        finally:
            self._skip = None
        self._position = skip
        return iterator

