"""A NaN or Inf training loss never trains on: NonFiniteLossGuard stops the run naming the global step, the batch and
its query ids, or (skip_nonfinite_batches) skips that optimizer step, counted and logged. Automatic optimisation,
manual optimisation (GradCache) and the CLI default."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from datamodules.retrieval import RetrievalDataModule
from modules.bi_encoder import BiEncoderModule
from research.cli.main import main
from research.training.callbacks import NonFiniteLossError, NonFiniteLossGuard

BAD_STEP = 3


class BadLossAtStep(BiEncoderModule):
    """The bi-encoder whose loss is ``bad_value`` at global step ``bad_step`` (every mode goes through ``_loss``)."""

    def __init__(self, bad_step: int = BAD_STEP, bad_value: float = float("nan"), **kwargs) -> None:
        super().__init__(**kwargs)
        self.bad_step, self.bad_value = bad_step, bad_value

    def _loss(self, batch, queries, documents):
        loss, terms = super()._loss(batch, queries, documents)
        if self.trainer.global_step == self.bad_step:
            loss = loss * self.bad_value if self.bad_value != float("inf") else loss + self.bad_value
        return loss, terms


class Snapshots(Callback):
    """Parameters before and after each training batch, by global step."""

    def __init__(self) -> None:
        self.before: dict[int, dict[str, torch.Tensor]] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}
        self.query_ids: dict[int, list[str]] = {}

    @staticmethod
    def _params(module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in module.named_parameters()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[trainer.global_step] = self._params(pl_module)
        self.query_ids[trainer.global_step] = list(batch.query_ids)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step - 1] = self._params(pl_module)


def _fit(model_dir, data_dir, guard, bad_value=float("nan"), steps: int = 6, **module_kwargs):
    L.seed_everything(0, verbose=False)
    module = BadLossAtStep(model=str(model_dir), bad_value=bad_value, lr=1e-3, warmup_ratio=0.0, **module_kwargs)
    data = RetrievalDataModule(str(data_dir), eval_split=None, batch_size=4, num_negatives=1)
    snapshots = Snapshots()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[guard, snapshots])
    return trainer, module, data, snapshots


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_loss_stops_naming_step_batch_and_queries(tiny_model_dir, tiny_beir_dir, bad_value):
    trainer, module, data, snapshots = _fit(tiny_model_dir, tiny_beir_dir, NonFiniteLossGuard(), bad_value)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit(module, datamodule=data)
    message = str(info.value)
    value = "nan" if bad_value != float("inf") else "inf"
    assert f"non-finite training loss ({value}) at global step {BAD_STEP} (epoch 0, batch {BAD_STEP}; query ids " in message
    assert ", ".join(snapshots.query_ids[BAD_STEP]) in message
    assert "skip_nonfinite_batches" in message and "\n" not in message
    assert trainer.global_step == BAD_STEP
    params = dict(module.named_parameters())
    assert all(torch.isfinite(p).all() for p in params.values())
    assert _same({k: p.detach() for k, p in params.items()}, snapshots.before[BAD_STEP])  # nothing trained on it
    assert not _same(snapshots.before[BAD_STEP], snapshots.before[0])  # the earlier steps did train


@pytest.mark.parametrize("gradcache", [None, 4], ids=["automatic", "gradcache-manual"])
def test_skip_nonfinite_batches_skips_that_step_only(tiny_model_dir, tiny_beir_dir, gradcache, capsys):
    guard = NonFiniteLossGuard(skip_nonfinite_batches=True)
    trainer, module, data, snapshots = _fit(tiny_model_dir, tiny_beir_dir, guard, gradcache_chunk_size=gradcache)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 6 and guard.skipped == 1
    assert _same(snapshots.after[BAD_STEP], snapshots.before[BAD_STEP])  # the NaN step updated nothing
    for step in (BAD_STEP - 1, BAD_STEP + 1):
        assert not _same(snapshots.after[step], snapshots.before[step])  # its neighbours did train
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert float(trainer.callback_metrics["train/skipped_nonfinite_batches"]) == 1.0
    err = capsys.readouterr().err
    assert f"skipped the optimizer step for the non-finite training loss (nan) at global step {BAD_STEP}" in err
    assert "(1 skipped so far)" in err


def test_max_skipped_batches_stops(tiny_model_dir, tiny_beir_dir):
    guard = NonFiniteLossGuard(skip_nonfinite_batches=True, max_skipped_batches=0)
    trainer, module, data, _ = _fit(tiny_model_dir, tiny_beir_dir, guard)
    with pytest.raises(NonFiniteLossError, match="more than max_skipped_batches=0"):
        trainer.fit(module, datamodule=data)


CONFIG = """\
seed_everything: 1
test_after_fit: false
save_model: false
trainer:
  max_steps: 5
  accelerator: cpu
  devices: 1
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  limit_val_batches: 0
model:
  class_path: test_numerical_faults.BadLossAtStep
  init_args:
    bad_step: 2
    model: {model}
data:
  class_path: datamodules.RetrievalDataModule
  init_args:
    data: {data}
    eval_split: null
    batch_size: 4
"""


def test_cli_installs_the_guard_by_default(tiny_model_dir, tiny_beir_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "nan.yaml"
    config.write_text(CONFIG.format(model=tiny_model_dir, data=tiny_beir_dir))
    assert main(["fit", "--config", str(config), "--run_dir", str(tmp_path / "stop")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("research: error:")]
    assert errors == [err[-1]] and "Traceback" not in "\n".join(err)
    assert errors[0].startswith("research: error: non-finite training loss (nan) at global step 2 (epoch 0, batch 2; query ids ")

    assert main(["fit", "--config", str(config), "--run_dir", str(tmp_path / "skip"), "--skip_nonfinite_batches", "true"]) == 0
    assert "skipped the optimizer step for the non-finite training loss (nan) at global step 2" in capsys.readouterr().err
