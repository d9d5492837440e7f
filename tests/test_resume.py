"""Nothing lost: an interrupted ``research fit`` resumes to the very weights of an uninterrupted run, and every
output is replaced atomically (an exception in the middle of a write leaves the previous file intact).

The kill-and-resume test runs ``research fit`` in a subprocess, lets it pause right after step 17 (the last step
checkpoint was written after step 15, mid-way through epoch 1), SIGKILLs it, resumes with ``--ckpt_path last`` and
compares the final weights and metrics with an uninterrupted run of the same seed. Dropout is on (the test module
trains in train mode), so the per-batch RNG, the data position within the epoch, the optimizer and the LR schedule
must all resume exactly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from datamodules.loader import ResumableDataLoader
from datamodules.retrieval import EpochShuffleSampler
from modules.bi_encoder import BiEncoderModule
from research.cli.main import main
from research.data.trec import read_run, write_run
from research.data.votes import Vote, read_votes, write_votes
from research.io import atomic_directory, atomic_write, write_json, write_jsonl
from research.training.callbacks import AtomicCheckpointIO

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-6
PAUSE_STEP, CHECKPOINT_EVERY = 17, 5  # 12 batches per epoch: paused in epoch 1, last checkpoint after step 15


class TrainingBiEncoder(BiEncoderModule):
    """The bi-encoder in train mode during fit (``from_pretrained`` returns eval mode): dropout is active."""

    def on_train_start(self) -> None:
        self.train()


class PauseAtStep(Callback):
    """Write ``marker`` and sleep before training step ``step``: a kill then lands mid-epoch, deterministically."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            Path(self.marker).write_text(f"{trainer.global_step} {trainer.current_epoch} {batch_idx}\n")
            time.sleep(600)


CONFIG = """\
seed_everything: 11
evaluate_before_fit: false
test_after_fit: true
checkpoint_every_n_steps: {every}
trainer:
  max_epochs: 2
  accelerator: cpu
  devices: 1
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  limit_val_batches: 0
  log_every_n_steps: 1
{callbacks}model:
  class_path: test_resume.TrainingBiEncoder
  init_args:
    model: {model}
    lr: 2.0e-3
    warmup_ratio: 0.2
    loss:
      class_path: research.losses.InfoNCE
data:
  class_path: datamodules.RetrievalDataModule
  init_args:
    data: {data}
    train_split: train
    eval_split: test
    batch_size: 4
    eval_batch_size: 16
    num_negatives: 1
    seed: 3
"""


def _config(path: Path, model: Path, data: Path, pause_marker: Path | None = None) -> Path:
    callbacks = ""
    if pause_marker is not None:
        callbacks = (f"  callbacks:\n    - class_path: test_resume.PauseAtStep\n      init_args:\n"
                     f"        step: {PAUSE_STEP}\n        marker: {pause_marker}\n")
    path.write_text(CONFIG.format(every=CHECKPOINT_EVERY, callbacks=callbacks, model=model, data=data))
    return path


def _env() -> dict[str, str]:
    tests = str(Path(__file__).resolve().parent)
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
            "PYTHONPATH": os.pathsep.join([tests, str(REPO), os.environ.get("PYTHONPATH", "")])}


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


def test_killed_fit_resumes_to_the_uninterrupted_weights(tiny_model_dir, tiny_beir_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    plain = _config(tmp_path / "fit.yaml", tiny_model_dir, tiny_beir_dir)
    marker = tmp_path / "paused"
    pausing = _config(tmp_path / "fit_pause.yaml", tiny_model_dir, tiny_beir_dir, marker)
    resumed_dir, reference_dir = tmp_path / "resumed", tmp_path / "reference"

    exe = Path(sys.executable).with_name("research")
    process = subprocess.Popen([str(exe), "fit", "--config", str(pausing), "--run_dir", str(resumed_dir)],
                               cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            if process.poll() is not None:
                pytest.fail(f"research fit ended before step {PAUSE_STEP}:\n{process.stdout.read()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("research fit did not reach the pause step in 300 s")
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    step, epoch, batch_idx = map(int, marker.read_text().split())
    assert (step, epoch, batch_idx) == (PAUSE_STEP, 1, PAUSE_STEP - 12)  # killed mid-way through epoch 1
    last = resumed_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)  # Lightning checkpoints load without unpickling code
    assert checkpoint["global_step"] == 15 and checkpoint["epoch"] == 1
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 3}]
    assert not (resumed_dir / "model").exists()
    assert not list(last.parent.glob(".*.tmp"))  # no temporary checkpoint left behind

    # a fresh fit in the same run directory refuses, and says how to resume
    assert main(["fit", "--config", str(plain), "--run_dir", str(resumed_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--ckpt_path last" in err[0] and str(last) in err[0], err

    assert main(["fit", "--config", str(plain), "--run_dir", str(resumed_dir), "--ckpt_path", "last"]) == 0
    assert f"resuming from {last} (the interrupted attempt's records kept as" in capsys.readouterr().err
    assert (resumed_dir / "run_info.attempt1.json").is_file() and (resumed_dir / "config.attempt1.yaml").is_file()
    assert main(["fit", "--config", str(plain), "--run_dir", str(reference_dir)]) == 0

    resumed, reference = _weights(resumed_dir), _weights(reference_dir)
    assert resumed.keys() == reference.keys()
    difference = max(float((resumed[k] - reference[k]).abs().max()) for k in reference)
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    moved = max(float((reference[k] - initial[k]).abs().max()) for k in reference if k in initial)
    with capsys.disabled():
        print(f"\nkill at step {PAUSE_STEP} (epoch 1, batch {batch_idx}), resume from the step-15 checkpoint: max abs "
              f"weight difference to the uninterrupted run {difference:.3e} (training moved weights by {moved:.3e})")
    assert moved > 1e-3
    assert difference <= TOLERANCE
    metrics = [json.loads((d / "eval_after" / "metrics.json").read_text()) for d in (resumed_dir, reference_dir)]
    for key in ("nDCG@10", "RR@10", "R@100", "AP@100"):
        assert metrics[0][key] == pytest.approx(metrics[1][key], abs=TOLERANCE)
    assert read_run(resumed_dir / "eval_after" / "run.trec").keys() == read_run(reference_dir / "eval_after" / "run.trec").keys()


def test_ckpt_path_last_needs_a_run_dir(tiny_model_dir, tiny_beir_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    config = _config(tmp_path / "fit.yaml", tiny_model_dir, tiny_beir_dir)
    assert main(["fit", "--config", str(config), "--ckpt_path", "last"]) == 2
    err = capsys.readouterr().err
    assert err == "research: error: --ckpt_path last resumes the run in --run_dir: give --run_dir DIR (the run to resume)\n"


# ------------------------------------------------------------------ the data position within an epoch
class _Indexable(list):
    def __getitem__(self, key):  # EpochShuffleSampler yields (epoch, index)
        return key


def _batches(loader, epoch: int) -> list[list[int]]:
    loader.sampler.set_epoch(epoch)
    return list(loader)


def _group_loader(workers: int = 0) -> ResumableDataLoader:
    return ResumableDataLoader(_Indexable(range(10)), batch_size=3, drop_last=True, sampler=EpochShuffleSampler(10, 4),
                               collate_fn=_ids, num_workers=workers, persistent_workers=workers > 0)


def _ids(items):
    return [i for _, i in items]


def test_resumable_loader_with_workers():
    """Worker processes prefetch indices when the iterator starts: it starts at the first batch, after set_epoch."""
    reference = _batches(_group_loader(), 1)
    loader = _group_loader(workers=2)
    loader.load_state_dict({"epoch": 1, "batches": 2})
    iterator = iter(loader)
    loader.sampler.set_epoch(1)
    assert list(iterator) == reference[2:]
    assert _batches(loader, 2) == _batches(_group_loader(), 2)  # persistent workers: the next epoch is whole


def test_resumable_loader_skips_what_was_trained_on():
    full = _group_loader()
    epoch1 = _batches(full, 1)
    assert len(epoch1) == 3 and len(full) == 3
    iterator = iter(full)
    first = next(iterator)
    state = full.state_dict()
    assert first == epoch1[0] and state == {"epoch": 1, "batches": 1}

    resumed = _group_loader()
    resumed.load_state_dict(state)
    iterator = iter(resumed)  # Lightning creates the iterator, then sets the epoch, then draws the first batch
    resumed.sampler.set_epoch(1)
    assert list(iterator) == epoch1[1:] and resumed.state_dict() == {"epoch": 1, "batches": 3}
    assert _batches(resumed, 2) == _batches(full, 2)  # the next epoch is whole

    at_end = _group_loader()
    at_end.load_state_dict({"epoch": 1, "batches": 3})  # saved at the end of epoch 1: Lightning resumes at epoch 2
    assert _batches(at_end, 2) == _batches(full, 2)


# ------------------------------------------------------------------ atomic outputs
class _Explodes:
    def __reduce__(self):
        raise RuntimeError("boom while serialising")


def test_checkpoint_write_interrupted_keeps_the_previous_file(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    before = path.read_bytes()
    big = {"state_dict": {"w": torch.zeros(1000, 100)}, "later": _Explodes()}
    with pytest.raises(RuntimeError, match="boom"):
        io.save_checkpoint(big, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
    loaded = io.load_checkpoint(path)
    assert loaded["global_step"] == 1 and torch.equal(loaded["state_dict"]["w"], torch.ones(3))


def test_writers_interrupted_keep_the_previous_file(tmp_path):
    run_file = tmp_path / "run.trec"
    write_run(run_file, {"q1": {"d1": 2.0, "d2": 1.0}})
    before = run_file.read_bytes()
    with pytest.raises(ValueError, match="not finite"):
        write_run(run_file, {"q1": {"d1": 3.0}, "q2": {"d3": float("nan")}})  # fails after writing q1's line
    assert run_file.read_bytes() == before and read_run(run_file) == {"q1": {"d1": 2.0, "d2": 1.0}}

    def votes():
        yield Vote("q1", "a", "b", 0.75)
        raise KeyboardInterrupt  # the judge was interrupted mid-way

    votes_file = tmp_path / "votes.jsonl"
    write_votes(votes_file, [Vote("q1", "a", "c", 0.5)])
    with pytest.raises(KeyboardInterrupt):
        write_votes(votes_file, votes())
    assert [v.doc_b for v in read_votes(votes_file)] == ["c"]

    def records():
        yield {"a": 1}
        raise OSError("disk full")

    for path, write in ((tmp_path / "groups.jsonl", lambda p: write_jsonl(p, records())),
                        (tmp_path / "metrics.json", lambda p: write_json(p, {"x": object()}))):
        write_json(path, {"previous": True}) if path.suffix == ".json" else write_jsonl(path, [{"previous": True}])
        before = path.read_bytes()
        with pytest.raises((OSError, TypeError)):
            write(path)
        assert path.read_bytes() == before
    with pytest.raises(RuntimeError), atomic_write(tmp_path / "report.md") as handle:
        handle.write("half a report")
        raise RuntimeError
    assert not (tmp_path / "report.md").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_saved_model_folder_is_replaced_whole(tmp_path):
    model = tmp_path / "run" / "model"
    with atomic_directory(model) as folder:
        (folder / "model.safetensors").write_text("v1")
        (folder / "config.json").write_text("{}")
    with pytest.raises(RuntimeError), atomic_directory(model) as folder:
        (folder / "model.safetensors").write_text("v2, half written")
        raise RuntimeError("killed while saving")
    assert (model / "model.safetensors").read_text() == "v1" and (model / "config.json").is_file()
    with atomic_directory(model) as folder:
        (folder / "model.safetensors").write_text("v2")
    assert sorted(p.name for p in model.iterdir()) == ["model.safetensors"]
    assert (model / "model.safetensors").read_text() == "v2"
    assert sorted(p.name for p in model.parent.iterdir()) == ["model"]
