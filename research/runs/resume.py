"""Resuming a ``research fit`` run: ``--ckpt_path last`` resumes ``<run_dir>/checkpoints/last.ckpt``, an existing
checkpoint is never overwritten by a fresh run that was not asked to resume, a finished run (``model/``,
``eval_after/``, ``FINISHED``) is replaced only with ``--overwrite true``, and the interrupted attempt's records are
kept."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from research.errors import ResearchError
from research.runs.layout import (
    CONFIG_FILE,
    EVAL_AFTER,
    FINISHED_MARKER,
    HPARAMS_FILE,
    METRICS_CSV,
    MODEL_DIR,
    last_checkpoint,
)
from research.training.tracking import RUN_INFO_FILE


def check_resume(subcommand: str, run_dir: str | Path | None, ckpt_path: str | None,
                 argv: list[str] | None = None, overwrite: bool = False) -> None:
    """Refuse to start a fresh ``fit`` over an earlier run's checkpoints, or over a finished run unless ``overwrite``
    (:func:`finished_run`); explain ``--ckpt_path last``."""
    if subcommand != "fit":
        return
    if ckpt_path == "last" and not run_dir:
        raise ResearchError("--ckpt_path last resumes the run in --run_dir: give --run_dir DIR (the run to resume)")
    if not run_dir:
        return  # a new timestamped run directory
    last = last_checkpoint(run_dir)
    if ckpt_path == "last":
        if not launched_as_rank_zero():
            return  # a process Lightning (or torchrun) started for another rank: rank 0 keeps the records and reports
        if last.is_file():
            kept = keep_attempt_records(run_dir)
            print(f"research: resuming from {last}" + (f" (the interrupted attempt's records kept as {kept})"
                                                       if kept else ""), file=sys.stderr)
        else:
            print(f"research: no checkpoint to resume in {last.parent}: training from the start", file=sys.stderr)
    elif ckpt_path is None and last.is_file():
        command = "research " + " ".join(argv or ["fit", "..."])
        raise ResearchError(
            f"{run_dir} holds an earlier run's checkpoint {last}: resume it with `{command} --ckpt_path last`, "
            f"or start over in another --run_dir (or after deleting {last.parent})"
        )
    elif ckpt_path is None and not overwrite and (found := finished_run(run_dir)):
        raise ResearchError(f"{run_dir} holds a finished run ({', '.join(found)}): a new fit would replace it; "
                            f"pass --overwrite true to replace it, or choose another --run_dir")


def finished_run(run_dir: str | Path) -> list[str]:
    """What marks ``run_dir`` as holding a finished run: its ``model/``, ``eval_after/`` and ``FINISHED``."""
    run_dir = Path(run_dir)
    return [f"{name}/" if (run_dir / name).is_dir() else name for name in (MODEL_DIR, EVAL_AFTER, FINISHED_MARKER)
            if (run_dir / name).exists()]


def launched_as_rank_zero() -> bool:
    """False in the processes a launcher started for the other ranks (``LOCAL_RANK``/``NODE_RANK``/``RANK``/
    ``SLURM_PROCID`` set and non-zero)."""
    return all(os.environ.get(name, "0") in ("", "0") for name in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"))


ATTEMPT_RECORDS = (RUN_INFO_FILE, CONFIG_FILE, METRICS_CSV, HPARAMS_FILE)


def keep_attempt_records(run_dir: str | Path) -> str | None:
    """Before a resume rewrites them, rename the run directory's records of the interrupted attempt
    (``run_info.json``, ``config.yaml``, ``metrics.csv``, ``hparams.yaml``) to ``<name>.attempt<k>.<ext>``."""
    run_dir = Path(run_dir)
    present = [name for name in ATTEMPT_RECORDS if (run_dir / name).is_file()]
    if not present:
        return None
    attempt = 1
    while any((run_dir / _attempt_name(name, attempt)).exists() for name in ATTEMPT_RECORDS):
        attempt += 1
    for name in present:
        os.replace(run_dir / name, run_dir / _attempt_name(name, attempt))
    return str(run_dir / f"*.attempt{attempt}.*")


def _attempt_name(name: str, attempt: int) -> str:
    stem, dot, ext = name.rpartition(".")
    return f"{stem}.attempt{attempt}.{ext}" if dot else f"{name}.attempt{attempt}"

