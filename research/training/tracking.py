"""Experiment tracking: Weights & Biases (offline unless the user's settings say online), CSV otherwise.

No W&B key ever passes through here: wandb reads it from the user's environment or ``~/.netrc``.
"""

from __future__ import annotations

import json
import netrc
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from research.io import write_json
from research.safety import redact_argv

TRACKED_PACKAGES = ("torch", "lightning", "transformers", "sentence-transformers", "peft", "faiss-cpu", "faiss-gpu",
                    "bm25s", "wandb", "deepspeed", "numpy", "scipy")
RUN_INFO_FILE = "run_info.json"  # named here, where it is written; research.runs.resume keeps it across resumes


def wandb_mode() -> str:
    """``disabled``, ``online`` or ``offline``: online only when WANDB_MODE says so or a key is configured."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("disabled", "online", "offline"):
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError):
        pass
    return "offline"


def default_logger(run_dir: Path, name: str, project: str = "research", group: str | None = None) -> Logger:
    mode = wandb_mode()
    if mode == "disabled":
        return CSVLogger(save_dir=str(run_dir), name="", version="")
    logger = WandbLogger(project=os.environ.get("WANDB_PROJECT", project), name=name, save_dir=str(run_dir),
                         offline=mode == "offline", group=group)
    # Lightning passes anonymous=None to wandb.init, which wandb >= 0.19 answers with a deprecation warning on every
    # run: leave the setting out, as a user who never asked for it would
    if logger._wandb_init.get("anonymous", "unset") is None:
        del logger._wandb_init["anonymous"]
    return logger


def run_info(seed: int | None = None) -> dict:
    """What makes a number traceable: git commit, package versions, seed, command line, host."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, cwd=Path(__file__).resolve().parent).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    versions = {}
    for package in TRACKED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return {"git_commit": commit, "git_dirty": dirty, "seed": seed, "argv": redact_argv(sys.argv), "python": sys.version.split()[0],
            "platform": platform.platform(), "packages": versions}


def write_run_info(run_dir: Path, seed: int | None = None) -> None:
    write_json(Path(run_dir) / RUN_INFO_FILE, json.loads(json.dumps(run_info(seed), default=str)))
