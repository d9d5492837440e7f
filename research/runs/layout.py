"""The names inside run folders, and the program that runs a ``research`` command: the one place to spell them.

A ``research fit`` run folder (``runs/<name>/<time>`` unless ``--run_dir``)::

    config.yaml  hparams.yaml  metrics.csv   Lightning's records (run_info.json: research.training.tracking)
    checkpoints/last.ckpt                    what ``--ckpt_path last`` resumes
    eval_before/  eval_after/                evaluations before and after fit (eval/ for ``research test``)
    model/                                   the trained model (save_pretrained)

An evaluation folder holds ``run.trec``, ``metrics.json`` and ``per_query.json``: named by the layer that writes them,
:mod:`research.eval.evaluation`, and re-exported here. A sweep folder ``runs/sweeps/<sweep>`` holds
``sweep_state.json``, ``sweep_events.jsonl``, ``report/`` (``report.csv``, ``runs.csv``, ``report.md``) and one run
folder per run, which adds ``override.yaml``, ``sweep_run.json``, ``stdout.log`` and, once the run is complete,
``FINISHED``. ``research reproduce FILE`` writes ``runs/reproduce/<file>/reproduce.md`` (with ``reproduce.json``, the
rows' results, beside it) and, per row, ``<row>/`` with ``log.txt``, ``reproduce.json``, the row's run file and, for a
re-ranker it trains, the run folder ``train/``.
"""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

# Re-exported (``X as X``): the evaluation layer names the files it writes, run-folder readers find them here.
from research.eval.evaluation import METRICS_FILE as METRICS_FILE
from research.eval.evaluation import PER_QUERY_FILE as PER_QUERY_FILE
from research.eval.evaluation import RUN_FILE as RUN_FILE

# Read at call time (``[*layout.RESEARCH_PROGRAM, ...]``), so that tests can swap in a stand-in for `research`.
RESEARCH_PROGRAM = [sys.executable, "-m", "research.cli"]

RUNS_ROOT = Path("runs")
SWEEPS_DIR = "sweeps"
SWEEPS_ROOT = RUNS_ROOT / SWEEPS_DIR
REPRODUCE_ROOT = RUNS_ROOT / "reproduce"

# ---------------------------------------------------------------- a `research fit` run folder
EVAL_BEFORE = "eval_before"
EVAL_AFTER = "eval_after"
EVAL_DIR = "eval"
MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
VAL_HISTORY_FILE = "val_history.json"  # every validation's val/ metrics (research.training.callbacks.ValidationHistory)
# Lightning's own names (SaveConfigCallback, CSVLogger): spelled here so that readers agree with what it writes.
CONFIG_FILE = "config.yaml"
METRICS_CSV = "metrics.csv"
HPARAMS_FILE = "hparams.yaml"

# ---------------------------------------------------------------- a sweep folder and its run folders
SWEEP_STATE_FILE = "sweep_state.json"
SWEEP_EVENTS_FILE = "sweep_events.jsonl"
SWEEP_LOCK_FILE = ".lock"
OVERRIDE_FILE = "override.yaml"
SWEEP_RUN_FILE = "sweep_run.json"
FINISHED_MARKER = "FINISHED"
STDOUT_LOG = "stdout.log"
REPORT_DIR = "report"  # `research report`'s default output folder, holding the three files below
REPORT_CSV = "report.csv"
ONE_FACTOR_CSV = "one_factor.csv"  # research report --one-factor: pairs of configurations differing in one parameter
RUNS_CSV = "runs.csv"
REPORT_MD = "report.md"

# ---------------------------------------------------------------- a `research reproduce` row folder
ROW_LOG = "log.txt"
ROW_RESULT = "reproduce.json"
REPRODUCE_TABLE = "reproduce.md"
ROW_TRAIN_DIR = "train"
INTERPOLATED_DIR = "interpolated"  # where `research rerank --interpolate` writes the fused run


def timestamped_run_dir(name: str) -> Path:
    """``runs/<name>/<YYYYmmdd-HHMMSS>``: a fresh folder for a run given no ``--run_dir``."""
    return RUNS_ROOT / name / datetime.now().strftime("%Y%m%d-%H%M%S")


def last_checkpoint(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / LAST_CHECKPOINT
