"""Validation on a dev split carved from train, on tiny models: ``val/`` metrics logged each epoch on the DataModules'
``val_split``; a monitored ModelCheckpoint picks the epoch with the best val metric and ``research fit`` saves and
tests that checkpoint; EarlyStopping from YAML; the test split never enters the choice (refused as val, and other
test judgments leave the choice unchanged)."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import lightning as L
import pytest

from datamodules import CandidateGroupsDataModule, RetrievalDataModule
from research.cli.main import main
from research.data.splits import write_dev_split
from research.errors import ResearchError

FIT = """\
seed_everything: 7
run_dir: {run_dir}
evaluate_before_fit: false
trainer:
  max_epochs: {epochs}
  accelerator: cpu
  devices: 1
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  log_every_n_steps: 1
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{monitor: val/nDCG@10, mode: max, save_top_k: 1, filename: "best-{{epoch}}"}}
{extra}model:
  class_path: modules.BiEncoderModule
  init_args:
    model: {model}
    lr: {lr}
    warmup_ratio: 0.0
    cache_corpus_embeddings: false
    loss:
      class_path: research.losses.InfoNCE
data:
  class_path: datamodules.RetrievalDataModule
  init_args:
    data: {data}
    train_split: train
    val_split: {val_split}
    eval_split: test
    batch_size: 4
    eval_batch_size: 16
    num_negatives: 1
"""
LR = 1.0e-2
EARLY_STOP = """\
    - class_path: lightning.pytorch.callbacks.EarlyStopping
      init_args: {monitor: val/nDCG@10, mode: max, patience: 1}
"""


@pytest.fixture
def dev_data(tiny_beir_dir, tmp_path) -> Path:
    return write_dev_split(tiny_beir_dir, tmp_path / "tiny-dev", dev_share=0.25, seed=0)


def fit(tmp_path: Path, model: Path, data: Path, name: str, epochs: int = 6, early_stop: bool = False,
        val_split: str = "dev", lr: float = LR) -> Path:
    run_dir = tmp_path / name
    config = tmp_path / f"{name}.yaml"
    config.write_text(FIT.format(run_dir=run_dir, epochs=epochs, model=model, data=data, val_split=val_split, lr=lr,
                                 extra=EARLY_STOP if early_stop else ""))
    assert main(["fit", "--config", str(config)]) == 0
    return run_dir


def val_series(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return [float(row["val/nDCG@10"]) for row in csv.DictReader(handle) if row.get("val/nDCG@10")]


def test_validation_picks_the_best_epoch_and_fit_saves_and_tests_it(tiny_model_dir, dev_data, tmp_path, monkeypatch,
                                                                    capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")  # CSV logger: metrics.csv
    monkeypatch.chdir(tmp_path)
    run_dir = fit(tmp_path, tiny_model_dir, dev_data, "run")
    series = val_series(run_dir)
    assert len(series) == 6  # one val/nDCG@10 per epoch, on dev
    best = max(range(len(series)), key=lambda i: (series[i], -i))  # ModelCheckpoint keeps the first of equal scores
    assert best != len(series) - 1, f"the tiny run must make selection matter: {series}"
    assert [p.name for p in (run_dir / "checkpoints").glob("best-*.ckpt")] == [f"best-epoch={best}.ckpt"]
    captured = capsys.readouterr()
    assert f"best-epoch={best}.ckpt (val/nDCG@10 {series[best]:.4f})" in captured.out
    # the dev curve is in the run folder whatever the logger, and on stderr, one entry per validation
    history = json.loads((run_dir / "val_history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(6))
    assert [h["metrics"]["nDCG@10"] for h in history] == pytest.approx(series, abs=1e-6)
    assert all(set(h["metrics"]) >= {"nDCG@10", "RR@10"} for h in history)
    assert f"validation (epoch {best}, step {history[best]['step']}): nDCG@10 {series[best]:.4f}" in captured.err
    # model/ holds the chosen epoch's weights: scored on dev it gives that epoch's val/nDCG@10 ...
    assert main(["evaluate", "--model", str(run_dir / "model"), "--data", str(dev_data), "--split", "dev",
                 "--batch-size", "16", "--out", str(tmp_path / "on-dev")]) == 0
    assert json.loads((tmp_path / "on-dev" / "metrics.json").read_text())["nDCG@10"] == pytest.approx(series[best],
                                                                                                      abs=1e-4)
    # ... and it is what the after-fit test scored on test
    assert main(["evaluate", "--model", str(run_dir / "model"), "--data", str(dev_data), "--split", "test",
                 "--batch-size", "16", "--out", str(tmp_path / "on-test")]) == 0
    after = json.loads((run_dir / "eval_after" / "metrics.json").read_text())
    assert after["nDCG@10"] == pytest.approx(json.loads((tmp_path / "on-test" / "metrics.json").read_text())["nDCG@10"],
                                             abs=1e-4)

    # other test judgments: the same val series and the same choice; only the after-fit test changes
    other = tmp_path / "other-test"
    shutil.copytree(dev_data, other, symlinks=True)
    test_qrels = other / "qrels" / "test.tsv"
    lines = test_qrels.read_text().splitlines()
    test_qrels.unlink()  # a link to the source's file: replace it, do not write through it
    docs = sorted({line.split("\t")[1] for line in lines[1:]})
    test_qrels.write_text("\n".join([lines[0]] + [f"{line.split(chr(9))[0]}\t{docs[i % len(docs)]}\t1"
                                                  for i, line in enumerate(lines[1:])]) + "\n")
    rerun = fit(tmp_path, tiny_model_dir, other, "rerun")
    assert val_series(rerun) == series
    assert [p.name for p in (rerun / "checkpoints").glob("best-*.ckpt")] == [f"best-epoch={best}.ckpt"]
    assert json.loads((rerun / "eval_after" / "metrics.json").read_text())["nDCG@10"] != after["nDCG@10"]


def test_early_stopping_from_yaml_stops_patience_epochs_after_the_best(tiny_model_dir, dev_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    series = val_series(fit(tmp_path, tiny_model_dir, dev_data, "early", epochs=12, early_stop=True))
    best = max(range(len(series)), key=lambda i: (series[i], -i))
    assert len(series) < 12 and len(series) == best + 2  # patience 1: one epoch without improvement, then stop


def test_the_test_split_cannot_be_the_validation_split(tiny_model_dir, dev_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "leak.yaml"
    config.write_text(FIT.format(run_dir=tmp_path / "leak", epochs=1, model=tiny_model_dir, data=dev_data,
                                 val_split="test", lr=LR, extra=""))
    assert main(["fit", "--config", str(config)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("research: error: val_split 'test' is also the eval split")


def test_a_val_split_sharing_queries_with_test_or_train_is_refused(dev_data, tmp_path):
    leaky = tmp_path / "leaky"
    shutil.copytree(dev_data, leaky, symlinks=True)
    dev = leaky / "qrels" / "dev.tsv"
    test_line = (dev_data / "qrels" / "test.tsv").read_text().splitlines()[1]
    dev.write_text(dev.read_text() + test_line + "\n")
    with pytest.raises(ResearchError, match=r"val split 'dev' and eval split 'test' share 1 queries"):
        RetrievalDataModule(str(leaky), val_split="dev").setup("fit")
    train_line = (dev_data / "qrels" / "train.tsv").read_text().splitlines()[1]
    dev.write_text((dev_data / "qrels" / "dev.tsv").read_text() + train_line + "\n")
    with pytest.raises(ResearchError, match=r"val split 'dev' and train split 'train' share 1 queries"):
        CandidateGroupsDataModule(str(leaky), val_split="dev", group_size=2, negative_rank_min=1,
                                  negative_rank_max=5).setup("fit")


def test_without_a_val_split_nothing_is_validated(tiny_model_dir, dev_data, tmp_path):
    from modules import BiEncoderModule

    module = BiEncoderModule(str(tiny_model_dir), lr=1e-3, cache_corpus_embeddings=False)
    data = RetrievalDataModule(str(dev_data), batch_size=4, num_negatives=1, seed=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    assert not any(key.startswith("val/") for key in trainer.callback_metrics)


def test_a_cross_encoder_validates_on_the_dev_candidates(tiny_model_dir, dev_data):
    from modules import CrossEncoderModule

    module = CrossEncoderModule(str(tiny_model_dir), lr=1e-3, max_length=32, query_max_length=8)
    data = CandidateGroupsDataModule(str(dev_data), val_split="dev", group_size=2, negative_rank_min=1,
                                     negative_rank_max=5, eval_top_k=5, batch_size=4, eval_batch_size=8)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    assert "val/nDCG@10" in trainer.callback_metrics
    dev_queries = set((dev_data / "qrels" / "dev.tsv").read_text().split()[3::3])
    assert set(module.last_evaluation.run) <= dev_queries  # the run validated is the dev queries'


def test_a_monitored_checkpoint_without_validation_is_an_error(tiny_model_dir, dev_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "noval.yaml"
    config.write_text(FIT.format(run_dir=tmp_path / "noval", epochs=1, model=tiny_model_dir, data=dev_data,
                                 val_split="null", lr=LR, extra=""))
    assert main(["fit", "--config", str(config)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and re.match(r"research: error: .*val/nDCG@10", errors[0]), errors


def test_validation_history_continues_after_a_resume(tmp_path, capsys):
    """The list lives in the callback's checkpoint state: a resumed run appends to it instead of starting over."""
    from types import SimpleNamespace

    import torch

    from research.training.callbacks import ValidationHistory

    def trainer(epoch: int, value: float, sanity: bool = False) -> SimpleNamespace:
        return SimpleNamespace(sanity_checking=sanity, is_global_zero=True, current_epoch=epoch, global_step=10 * epoch,
                               callback_metrics={"val/nDCG@10": torch.tensor(value), "train/loss": torch.tensor(1.0)})

    path = tmp_path / "val_history.json"
    first = ValidationHistory(path)
    first.on_validation_end(trainer(0, 0.5, sanity=True), None)  # the sanity check is not a validation
    first.on_validation_end(trainer(0, 0.5), None)
    first.on_validation_end(trainer(1, 0.625), None)
    resumed = ValidationHistory(path)
    resumed.load_state_dict(first.state_dict())
    resumed.on_validation_end(trainer(2, 0.75), None)
    assert json.loads(path.read_text()) == [{"epoch": e, "step": 10 * e, "metrics": {"nDCG@10": v}}
                                            for e, v in ((0, 0.5), (1, 0.625), (2, 0.75))]
    assert capsys.readouterr().err.count("validation (epoch") == 3
