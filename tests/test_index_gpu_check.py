"""benchmarks/gpu_check.sh, the parts a CPU machine can check: it parses (bash -n), its options build the intended
commands (--dry-run), bad options are one-line errors with exit code 2, and without a GPU it stops before running
anything, saying why (it never skips silently)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=60, env=env)


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_dry_run_builds_the_commands(tmp_path):
    done = _run("--dry-run", "--steps", "3", "--devices", "2", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    fits = [line for line in lines if " fit " in line]
    assert [line.split("experiments/strategies/")[1].split(".yaml")[0] for line in fits] == \
        ["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"]
    for line in fits:
        assert "--config experiments/scifact/bi_encoder.yaml" in line and "--trainer.max_steps 3" in line
        assert "--trainer.devices 2" in line and "--test_after_fit false" in line
    index, exact, ivf = lines[-3:]
    assert " index --model sentence-transformers/all-MiniLM-L6-v2 --data scifact" in index and "--devices 2" in index
    assert " search " in exact and exact.endswith("--gpu") and "--index-factory IVF64,Flat --nprobe 8" in ivf
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
    only = _run("--dry-run", "--only", "deepspeed_zero3,index").stdout.splitlines()
    assert len(only) == 4 and "deepspeed_zero3.yaml" in only[0] and "--trainer.devices" not in only[0]


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unknown option '--bogus'"),
    (["--steps", "0"], "--steps expects a positive integer, got '0'"),
    (["--steps"], "--steps needs a value"),
    (["--devices", "two"], "--devices expects a positive integer, got 'two'"),
    (["--only", "ddp,zero9"], "--only: unknown step 'zero9'"),
])
def test_bad_options_are_one_line_errors(args, message):
    done = _run(*args)
    assert done.returncode == 2 and done.stderr.startswith("gpu_check.sh: error: ") and message in done.stderr
    assert done.stderr.count("\n") == 1


def test_without_a_gpu_it_fails_clearly_before_running_anything(tmp_path):
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi: the no-GPU path is not reachable here")
    done = _run("--out", str(tmp_path / "out"))
    assert done.returncode == 2 and "no NVIDIA GPU here" in done.stderr and "needs a GPU host" in done.stderr
    assert not (tmp_path / "out").exists()
