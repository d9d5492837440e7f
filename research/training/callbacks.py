"""Reliability callbacks and plugins, installed by default by ``research fit`` (see docs/reliability.md).

* :class:`NonFiniteLossGuard`: a NaN/Inf training loss stops the run with a message naming the global step, the batch
  and its query ids, or (``skip_nonfinite_batches``) skips that optimizer step, counted and logged. Never trains on.
* :class:`ExactResume`: reseeds torch / numpy / random at every training batch from ``(seed, epoch, batch)`` and
  hands the saved data position back to the train loader, so a run resumed from a mid-epoch checkpoint trains on the
  same batches with the same dropout as the uninterrupted run.
* :class:`ValidationHistory`: every validation's ``val/`` metrics, epoch and step as one JSON list in the run folder
  (and one line on stderr), whatever the logger: the dev curve a monitored checkpoint was chosen on.
* :class:`AtomicCheckpointIO`: checkpoints written to a temporary file beside the target, fsynced, then renamed into
  place; loaded with ``weights_only=True``.
* :class:`RedactingSaveConfigCallback`: LightningCLI's ``config.yaml`` (written atomically), the hyperparameters sent to
  loggers and those stored in checkpoints, all with secret-looking values replaced by ``***``.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from research.errors import ResearchError
from research.io import atomic_write
from research.safety import REDACTED, find_secrets, redact
from research.seeds import stream_seed


class NonFiniteLossError(ResearchError):
    """The training loss was NaN or Inf: the run stopped before any parameter was updated with it."""


def batch_query_ids(batch: Any, limit: int = 8) -> list[str] | None:
    """The query ids of a training batch (``GroupBatch.query_ids``, a ``query_ids``/``qids`` key), if it has them."""
    ids = getattr(batch, "query_ids", None)
    if ids is None and isinstance(batch, dict):
        ids = batch.get("query_ids", batch.get("qids"))
    if ids is None or isinstance(ids, (str, torch.Tensor)):
        return None
    try:
        return [str(i) for i in list(ids)[:limit]] + (["..."] if len(ids) > limit else [])
    except TypeError:
        return None


class NonFiniteLossGuard(Callback):
    """Stop on (default) or skip a NaN / Inf training loss; never train on it.

    Every loss that reaches backward (``on_before_backward``, in automatic and manual optimisation alike, each
    micro-batch under gradient accumulation, each GradCache chunk) is checked. Before the optimizer step
    (``on_before_optimizer_step``, after backward, before clipping and the update) the decision is taken, the same on
    every rank (a NaN on any rank counts for all):

    * stop (default): raise :class:`NonFiniteLossError` naming the global step, the epoch, the batch index(es) and,
      for a ``GroupBatch``, its query ids. No parameter has been updated with the bad loss.
    * ``skip_nonfinite_batches=True``: drop every gradient (``param.grad = None``) so the optimizer step updates
      nothing (AdamW skips parameters without a gradient: no moment update, no weight decay), print a warning line,
      and log ``train/skipped_nonfinite_batches``. The step still counts (``global_step`` and a step-wise LR schedule
      advance). ``max_skipped_batches`` stops the run once more batches than that were skipped.

    Modules need nothing: the guard works from Lightning's hooks. Not for DeepSpeed in skip mode (DeepSpeed owns the
    gradients): refused at setup; stop mode works everywhere.
    """

    def __init__(self, skip_nonfinite_batches: bool = False, max_skipped_batches: int | None = None) -> None:
        if max_skipped_batches is not None and max_skipped_batches < 0:
            raise ValueError(f"max_skipped_batches must be >= 0 or None, got {max_skipped_batches}")
        self.skip_nonfinite_batches = skip_nonfinite_batches
        self.max_skipped_batches = max_skipped_batches
        self.skipped = 0
        self._batch: Any = None
        self._batch_idx: int | None = None
        self._bad: list[tuple[int | None, float, list[str] | None]] = []  # since the last optimizer step
        self._flags: list[tuple[torch.Tensor, torch.Tensor, int | None, list[str] | None]] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(skip_nonfinite_batches=self.skip_nonfinite_batches)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from lightning.pytorch.strategies import DeepSpeedStrategy

        if stage == "fit" and self.skip_nonfinite_batches and isinstance(trainer.strategy, DeepSpeedStrategy):
            raise ResearchError("skip_nonfinite_batches is not supported under DeepSpeed (it owns the gradients; its "
                                "fp16 loss scaler skips overflowing steps itself): set skip_nonfinite_batches: false")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch, self._batch_idx = batch, batch_idx

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        # no host sync here (the backward is queued at once): the flags are read once, before the optimizer step
        loss = loss.detach()
        self._flags.append((torch.isfinite(loss).all(), loss, self._batch_idx, batch_query_ids(self._batch)))

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        flags, self._flags = self._flags, []
        if flags and not bool(torch.stack([finite for finite, *_ in flags]).all()):  # one host sync per step
            for finite, loss, batch_idx, ids in flags:
                if not bool(finite):
                    value = loss.float().flatten()
                    self._bad.append((batch_idx, float(value[0]) if value.numel() else float("nan"), ids))
        bad = bool(self._bad)
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return
        where = self._describe(trainer)
        self._bad = []
        if not self.skip_nonfinite_batches:
            raise NonFiniteLossError(
                f"non-finite training loss {where}: training stopped before the update (no parameter changed); "
                "check the data and the learning rate, or set skip_nonfinite_batches: true "
                "(research fit --skip_nonfinite_batches true) to skip such batches"
            )
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = None
        self.skipped += 1
        if trainer.is_global_zero:
            print(f"research: warning: skipped the optimizer step for the non-finite training loss {where} "
                  f"({self.skipped} skipped so far)", file=sys.stderr)
        if self.max_skipped_batches is not None and self.skipped > self.max_skipped_batches:
            raise NonFiniteLossError(f"{self.skipped} batches with a non-finite training loss were skipped, more than "
                                     f"max_skipped_batches={self.max_skipped_batches}: training stopped")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.skipped:
            pl_module.log("train/skipped_nonfinite_batches", float(self.skipped), on_step=True, on_epoch=False,
                          batch_size=1, rank_zero_only=True)

    def _describe(self, trainer: L.Trainer) -> str:
        if not self._bad:
            return f"on another rank at global step {trainer.global_step} (epoch {trainer.current_epoch})"
        batches = sorted({index for index, _, _ in self._bad if index is not None})
        value = self._bad[0][1]
        ids = next((ids for _, _, ids in self._bad if ids), None)
        text = f"({value}) at global step {trainer.global_step} (epoch {trainer.current_epoch}, batch "
        text += ", ".join(map(str, batches)) if batches else "?"
        if ids:
            text += f"; query ids {', '.join(ids)}"
        if trainer.world_size > 1:
            text += f"; rank {trainer.global_rank}"
        return text + ")"

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))




class ExactResume(Callback):
    """Make a run resumed from a checkpoint continue exactly as the uninterrupted run would have.

    * RNG: Lightning checkpoints hold no RNG state, and a resumed run draws from the seed it starts with, so its
      dropout masks would differ. Before every training batch ``torch`` (all devices), ``numpy`` and ``random`` are
      reseeded from ``(seed, epoch, batch_idx, rank)``: the same masks whatever ran before (a restart, a validation
      loop, a DataLoader drawing its base seed). ``seed`` defaults to the run's ``seed_everything``
      (``PL_GLOBAL_SEED``); without either, no reseeding. The seed is stored in checkpoints; a resumed run uses it.
    * Data position: the saved position of a :class:`datamodules.loader.ResumableDataLoader` is handed back to it
      at ``on_train_start`` (Lightning 2.6 skips that when the train loader was built before the restore, e.g. by
      ``trainer.estimated_stepping_batches`` in ``configure_optimizers``), so the resumed epoch skips the batches
      already trained on instead of replaying them.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._loader_states: list[dict[str, Any]] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.seed is None and os.environ.get("PL_GLOBAL_SEED", "").lstrip("-").isdigit():
            self.seed = int(os.environ["PL_GLOBAL_SEED"])

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.seed is None:
            return
        seed = stream_seed(self.seed, trainer.current_epoch, batch_idx, trainer.global_rank)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)  # every CUDA device too

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("seed") is not None:
            self.seed = int(state_dict["seed"])

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
        self._loader_states = (fit_loop.get("state_dict") or {}).get("combined_loader") or None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        states, self._loader_states = self._loader_states, None
        if not states:
            return
        stateful = [loader for loader in _flatten_loaders(trainer.train_dataloader)
                    if callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))]
        if len(stateful) == len(states):
            for loader, state in zip(stateful, states):
                loader.load_state_dict(state)


class ValidationHistory(Callback):
    """Rewrites ``path`` (atomically) after each validation with the list of every validation so far: ``{"epoch",
    "step", "metrics": {name: value}}`` from the ``val/`` metrics the module logged; prints the same on stderr.
    Rank 0 only; the list is saved in checkpoints, so a resumed run continues it."""

    PREFIX = "val/"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.history: list[dict[str, Any]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = {key[len(self.PREFIX):]: float(value) for key, value in trainer.callback_metrics.items()
                   if key.startswith(self.PREFIX)}
        if not metrics:
            return
        record = {"epoch": trainer.current_epoch, "step": trainer.global_step, "metrics": metrics}
        self.history.append(record)
        with atomic_write(self.path) as handle:
            json.dump(self.history, handle, indent=1)
        print(f"validation (epoch {record['epoch']}, step {record['step']}): "
              + "  ".join(f"{name} {value:.4f}" for name, value in metrics.items()), file=sys.stderr, flush=True)

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))


def _flatten_loaders(loaders: Any) -> list[Any]:
    if isinstance(loaders, dict):
        return [item for value in loaders.values() for item in _flatten_loaders(value)]
    if isinstance(loaders, (list, tuple)):
        return [item for value in loaders for item in _flatten_loaders(value)]
    return [] if loaders is None else [loaders]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that never leaves a half-written checkpoint, and loads with ``weights_only=True``.

    Lightning's own save serialises into memory, then copies through an fsspec transaction whose temporary file lies
    in the system temp directory: on another filesystem the final move is a copy, and nothing is fsynced, so a kill
    or power loss can leave a truncated ``last.ckpt``. Here the bytes go to a temporary file in the target's folder,
    are fsynced, and ``os.replace`` swaps it in (then the folder is fsynced). Remote paths fall back to Lightning's.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("`Trainer.save_checkpoint(..., storage_options=...)` with `storage_options` arg"
                            f" is not supported for `{self.__class__.__name__}`.")
        if not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        with atomic_write(path, "wb") as handle:
            torch.save(checkpoint, handle)
        _fsync_directory(path.parent)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if map_location is None:
            map_location = lambda storage, loc: storage  # noqa: E731  (Lightning's default)
        return super().load_checkpoint(path, map_location=map_location,
                                       weights_only=True if weights_only is None else weights_only)


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class RedactingSaveConfigCallback(SaveConfigCallback):
    """LightningCLI's ``SaveConfigCallback`` with secrets redacted (``api_key``, ``token``, ``password``, ``secret``,
    ... and the values of secret environment variables) and ``config.yaml`` written atomically.

    Also redacts the hyperparameters Lightning sends to loggers (W&B's run config, CSV's hparams.yaml) and those it
    stores in checkpoints. A secret found in the config is reported once: pass secrets through the environment.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        _redact_hparams(pl_module)
        if trainer.datamodule is not None:
            _redact_hparams(trainer.datamodule)
        if self.already_saved:
            return
        secrets = find_secrets(self.config)
        if secrets and trainer.is_global_zero:
            print(f"research: warning: {', '.join(secrets)} look like secrets: written as {REDACTED} in config.yaml; "
                  "pass secrets through environment variables instead", file=sys.stderr)
        if self.save_to_log_dir:
            log_dir = trainer.log_dir
            assert log_dir is not None
            config_path = os.path.join(log_dir, self.config_filename)
            if not self.overwrite:
                exists = Path(config_path).is_file() if trainer.is_global_zero else False
                if trainer.strategy.broadcast(exists):
                    raise ResearchError(f"{config_path} exists: not overwriting the config of an earlier run")
            if trainer.is_global_zero:
                text = self.parser.dump(redact(self.config), skip_none=False)
                with atomic_write(config_path) as handle:
                    handle.write(text)
        if trainer.is_global_zero:
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        for key in ("hyper_parameters", "datamodule_hyper_parameters"):
            if key in checkpoint and find_secrets(checkpoint[key]):
                checkpoint[key] = redact(checkpoint[key])


def _redact_hparams(holder: Any) -> None:
    """Redact the copy of the hyperparameters that Lightning logs (``hparams_initial``); ``hparams`` stay usable."""
    initial = getattr(holder, "_hparams_initial", None)
    if initial is not None and find_secrets(initial):
        holder._hparams_initial = redact(initial)


DEFAULT_CHECKPOINT_EVERY_N_STEPS = 500


def default_callbacks(configured: Any, *, enable_checkpointing: bool | None, skip_nonfinite_batches: bool,
                      checkpoint_every_n_steps: int, validation_history: Path | None = None) -> list[Any]:
    """The configured callbacks plus what ``research fit`` adds unless configured: a step-interval
    ``ModelCheckpoint(save_last=True)``, :class:`NonFiniteLossGuard`, :class:`ExactResume` and (given a path)
    :class:`ValidationHistory`."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks = [] if configured is None else list(configured) if isinstance(configured, (list, tuple)) else [configured]
    kinds = tuple(type(c) for c in callbacks)
    if enable_checkpointing is not False and checkpoint_every_n_steps > 0 and not any(
            issubclass(k, ModelCheckpoint) for k in kinds):
        callbacks.append(ModelCheckpoint(every_n_train_steps=checkpoint_every_n_steps, save_last=True, save_top_k=0))
    if not any(issubclass(k, NonFiniteLossGuard) for k in kinds):
        callbacks.append(NonFiniteLossGuard(skip_nonfinite_batches=skip_nonfinite_batches))
    if not any(issubclass(k, ExactResume) for k in kinds):
        callbacks.append(ExactResume())
    if validation_history is not None and not any(issubclass(k, ValidationHistory) for k in kinds):
        callbacks.append(ValidationHistory(validation_history))
    return callbacks


def install_atomic_checkpoint_io(trainer: Any) -> None:
    """Use :class:`AtomicCheckpointIO` where the strategy would use Lightning's plain ``TorchCheckpointIO``."""
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    strategy = trainer.strategy
    try:
        current = strategy.checkpoint_io
    except (AttributeError, NotImplementedError):
        return
    if type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
