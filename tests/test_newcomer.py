"""A newcomer's first hour, progress and output: the one progress reporter (live line on a terminal, one line per
stage in logs, nothing with --quiet), the stages the long commands show, a tiny ``research fit`` whose stderr holds
none of the libraries' noise and starts with what the run will do, and output messages that name every file written."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from research import progress
from research.cli.main import main

REPO = Path(__file__).resolve().parents[1]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _default_progress():
    yield
    progress.configure(progress.AUTO)


# ------------------------------------------------------------------ the reporter
def test_lines_mode_prints_one_summary_per_outer_stage():
    stream = io.StringIO()
    progress.configure(progress.AUTO, stream)  # not a terminal: lines
    with progress.stage("encoding documents", total=5, unit="texts") as step:
        for _ in range(5):
            with progress.stage("inner batch", total=1):  # nested: silent in logs
                step.advance()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and "\r" not in stream.getvalue()
    assert re.fullmatch(r"encoding documents: 5 texts in \d+\.\d s \(.+ texts/s\)", lines[0]), lines


def test_live_mode_redraws_one_line_with_rate_and_eta(monkeypatch):
    stream = _Terminal()
    progress.configure(progress.AUTO, stream)
    monkeypatch.setattr(progress, "REFRESH_SECONDS", 0.0)
    with progress.stage("scoring pairs", total=4, unit="pairs") as step:
        with progress.stage("encoding queries", total=2, unit="texts") as inner:
            inner.advance(1)  # shown as a suffix of the outer line
        step.advance(2)
        step.advance(2)
    text = stream.getvalue()
    assert "\rscoring pairs 0/4 pairs (0%)" in text
    assert "| encoding queries 1/2 texts (50%)" in text
    assert re.search(r"\rscoring pairs 2/4 pairs \(50%\) .* pairs/s ETA \d", text)
    assert text.endswith("\x1b[K\n") and re.search(r"\rscoring pairs: 4 pairs in \d", text)


def test_quiet_prints_nothing_and_a_failed_stage_leaves_no_summary():
    stream = io.StringIO()
    progress.configure(progress.QUIET, stream)
    with progress.stage("searching", total=3) as step:
        step.advance(3)
    assert stream.getvalue() == ""
    progress.configure(progress.LINES, stream)
    with pytest.raises(ValueError), progress.stage("judging pairs", total=3):
        raise ValueError("boom")
    assert stream.getvalue() == ""  # the error is the line to read
    live = _Terminal()
    progress.configure(progress.AUTO, live)
    with pytest.raises(ValueError), progress.stage("judging pairs", total=3):
        raise ValueError("boom")
    assert live.getvalue().endswith("\r\x1b[K")  # the live line is cleared, not left half-drawn
    with pytest.raises(ValueError, match="choose from"):
        progress.configure("loud")


def test_track_counts_each_item():
    stream = io.StringIO()
    progress.configure(progress.LINES, stream)
    assert list(progress.track(range(4), "fitting", unit="steps")) == [0, 1, 2, 3]
    assert stream.getvalue().startswith("fitting: 4 steps in ")


# ------------------------------------------------------------------ the commands
def test_bm25_shows_its_stages_and_names_every_file_it_wrote(tiny_beir_dir, tmp_path, capsys):
    out = tmp_path / "bm25"
    assert main(["bm25", "--data", str(tiny_beir_dir), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert re.search(r"^indexing corpus: 36 documents in ", captured.err, re.M), captured.err
    assert re.search(r"^searching: 12 queries in ", captured.err, re.M), captured.err
    wrote = captured.out.strip().splitlines()[-1]
    assert wrote.startswith(f"wrote {out / 'run.trec'}, {out / 'metrics.json'}, {out / 'per_query.json'} (")
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "per_query.json", "run.trec"]
    assert main(["bm25", "--data", str(tiny_beir_dir), "--out", str(tmp_path / "quiet"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["bm25", "--data", str(tiny_beir_dir), "--out", str(tmp_path / "again")]) == 0
    assert "searching: 12 queries" in capsys.readouterr().err  # --quiet was that command's, not the next one's


def test_rerank_and_zelo_votes_report_scoring_and_judging(tiny_model_dir, tiny_beir_dir, tmp_path, capsys):
    from research.models.cross_encoder import CrossEncoder

    model = tmp_path / "ce"
    CrossEncoder.from_pretrained(tiny_model_dir).save_pretrained(model)
    capsys.readouterr()
    assert main(["rerank", "--model", str(model), "--data", str(tiny_beir_dir), "--out", str(tmp_path / "rr"),
                 "--top-k", "5", "--max-queries", "2"]) == 0
    captured = capsys.readouterr()
    assert re.search(r"^scoring pairs: 10 pairs in ", captured.err, re.M), captured.err
    assert f"wrote {tmp_path / 'rr' / 'run.trec'}, " in captured.out and "per_query.json" in captured.out
    assert main(["zelo", "votes", "--data", str(tiny_beir_dir), "--split", "test", "--max-queries", "2", "--top-n",
                 "4", "--all-pairs", "--judge", "bm25", "--out", str(tmp_path / "votes.jsonl")]) == 0
    captured = capsys.readouterr()
    assert re.search(r"^judging pairs: 12 pairs in ", captured.err, re.M), captured.err  # 2 queries x C(4, 2)
    assert main(["zelo", "fit", "--votes", str(tmp_path / "votes.jsonl"), "--out", str(tmp_path / "scores.jsonl")]) == 0
    assert re.search(r"^fitting: 2 queries in ", capsys.readouterr().err, re.M)


def test_evaluate_replaces_lightnings_bar_with_stages(tiny_model_dir, tiny_beir_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RESEARCH_CACHE_DIR", str(tmp_path / "cache"))  # an empty embedding cache: the corpus is encoded
    assert main(["evaluate", "--model", str(tiny_model_dir), "--data", str(tiny_beir_dir), "--out",
                 str(tmp_path / "dense"), "--max-queries", "3"]) == 0
    captured = capsys.readouterr()
    assert re.search(r"^encoding queries: 3 texts in ", captured.err, re.M), captured.err
    assert "Testing" not in captured.err and "it/s" not in captured.err
    assert f"wrote {tmp_path / 'dense' / 'run.trec'}, " in captured.out
    assert re.search(r"^encoding corpus: 36 texts in ", captured.err, re.M), captured.err
    assert "encoding documents" not in captured.err  # the module encodes the corpus: no document batches come
    assert main(["evaluate", "--model", str(tiny_model_dir), "--data", str(tiny_beir_dir), "--out",
                 str(tmp_path / "again"), "--max-queries", "3"]) == 0
    again = capsys.readouterr().err
    assert "encoding corpus" not in again and "encoding documents" not in again, again  # the cached shards serve


# ------------------------------------------------------------------ noise
NOISE = ("💡 Tip", "_pytree.py", "LeafSpec", "The anonymous setting has no effect", "in eval mode at the start of training")

FIT_YAML = """\
seed_everything: 3
run_dir: {run_dir}
evaluate_before_fit: true
trainer:
  max_steps: 2
  accelerator: cpu
  devices: 1
  enable_progress_bar: false
  enable_model_summary: false
  enable_checkpointing: false
  num_sanity_val_steps: 0
  limit_val_batches: 0
model:
  class_path: modules.BiEncoderModule
  init_args:
    model: {model}
    lr: 1.0e-3
    warmup_ratio: 0.0
data:
  class_path: datamodules.RetrievalDataModule
  init_args:
    data: {data}
    batch_size: 8
    eval_batch_size: 16
"""


def test_tiny_fit_stderr_has_no_library_noise_and_starts_with_the_plan(tiny_model_dir, tiny_beir_dir, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "model").mkdir(parents=True)  # a finished run's folder: replaced because --overwrite is given
    config = tmp_path / "tiny.yaml"
    config.write_text(FIT_YAML.format(run_dir=run_dir, model=tiny_model_dir, data=tiny_beir_dir))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline",
           "WANDB_SILENT": "false", "PYTHONWARNINGS": "default"}
    result = subprocess.run([str(Path(sys.executable).with_name("research")), "fit", "--config", str(config),
                             "--overwrite"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    for noise in NOISE:
        assert noise not in result.stderr, f"{noise!r} in stderr:\n{result.stderr}"
    plan = result.stderr[result.stderr.index("research fit: what this run will do"):].splitlines()[:7]
    assert plan[1].split() == ["run", "dir", str(run_dir)]
    assert plan[2].split()[:3] == ["model", "modules.BiEncoderModule:", str(tiny_model_dir)]
    assert plan[3].endswith("(36 documents); train 24 queries, test 12 queries"), plan
    assert plan[4].split(None, 1)[1] == "test on 'test' before fit -> fit 2 steps -> save model/ -> test on 'test' after fit"
    assert plan[5].split(None, 1)[1] == "8 per step (eval 16)"
    assert plan[6].split(None, 1)[1] == "32-true on 1 cpu device"
    assert "before fit:" in result.stdout and "after fit :" in result.stdout
    assert (run_dir / "model" / "config.json").is_file()


def test_silencing_is_exact_and_keeps_other_warnings():
    from research.cli.noise import LITLOGGER_TIP, silence_library_noise

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_library_noise()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
        warnings.warn("a real problem", UserWarning)
    assert [str(w.message) for w in caught] == ["a real problem"]
    records = []
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        logger.warning(f"{LITLOGGER_TIP}, try installing [litlogger]")
        logger.warning("GPU available: False, used: False")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["GPU available: False, used: False"]


def test_wandb_logger_leaves_the_anonymous_setting_out(tmp_path, monkeypatch):
    from research.training.tracking import default_logger

    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = default_logger(tmp_path, name="x")
    assert "anonymous" not in logger._wandb_init and logger._wandb_init["name"] == "x"


def test_train_mode_is_set_before_lightning_looks(tiny_model_dir):
    from modules.bi_encoder import BiEncoderModule

    module = BiEncoderModule(model=str(tiny_model_dir))
    module.eval()
    module.on_fit_start()
    assert all(m.training for m in module.modules())


# ------------------------------------------------------------------ report figure names
def test_report_figure_is_named_for_what_it_holds():
    from research.runs.report import plot_name

    assert plot_name(["nDCG@10", "RR@10", "R@100", "AP@100"], "model.init_args.loss.class_path") == "metrics_by_loss.png"
    assert plot_name(["nDCG@10"], "model.init_args.loss.class_path") == "nDCG_10_by_loss.png"
    assert plot_name(["nDCG@10", "RR@10"], None) == "metrics_by_configuration.png"


def test_committed_reports_link_figures_that_exist():
    reports = sorted((REPO / "experiments" / "results").glob("*/report.md"))
    assert reports
    for report in reports:
        for name in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text(encoding="utf-8")):
            assert (report.parent / name).is_file(), f"{report}: {name} is missing"


def test_save_evaluation_files_are_the_ones_named(tmp_path):
    from research.cli.options import wrote_evaluation
    from research.eval.evaluation import evaluate_run, save_evaluation

    save_evaluation(tmp_path, evaluate_run({"q": {"d": 1.0}}, {"q": {"d": 1}}))
    named = wrote_evaluation(tmp_path).removeprefix("wrote ").split(", ")
    assert sorted(named) == sorted(str(p) for p in tmp_path.iterdir())
    assert json.loads((tmp_path / "metrics.json").read_text())["num_queries"] == 1


def test_plan_warns_of_emulated_bfloat16_on_a_cpu_without_it(monkeypatch):
    import lightning as L
    import torch

    from research.cli import fit_plan
    from research.models import runtime

    trainer = L.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", logger=False, enable_checkpointing=False)
    for native, warned in ((torch.bfloat16, False), (torch.float32, True)):
        monkeypatch.setattr(runtime, "preferred_dtype", lambda device="cpu", native=native: native)
        assert ("no native bfloat16" in fit_plan._emulated_bf16(trainer)) is warned
    fp32 = L.Trainer(accelerator="cpu", devices=1, precision="32-true", logger=False, enable_checkpointing=False)
    assert fit_plan._emulated_bf16(fp32) == ""
