"""Shared helpers for the benchmark scripts: run one variant per fresh subprocess and collect its JSON result."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(result: dict) -> None:
    """Print a result line the parent process picks up."""
    print("RESULT " + json.dumps({**result, "peak_rss_mb": round(peak_rss_mb(), 1)}), flush=True)


def cpu_times() -> tuple[int, int] | None:
    """(steal, total) jiffies of all CPUs from /proc/stat (Linux), None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def steal_percent(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """CPU time the hypervisor gave to other guests between two :func:`cpu_times` readings, in percent."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return 100.0 * (after[0] - before[0]) / (after[1] - before[1])


def run_variant(script: str, variant: str, args: list[str]) -> dict:
    """Run ``script --variant VARIANT ARGS`` in a fresh interpreter (so peak RSS is its own) and parse its result.

    The result also gets ``steal_pct``: the share of CPU time stolen by the hypervisor while it ran (on a shared
    virtual machine a high value marks a disturbed, slower measurement)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    before = cpu_times()
    proc = subprocess.run([sys.executable, script, "--variant", variant, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    steal = steal_percent(before, cpu_times())
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"variant {variant} failed (exit {proc.returncode})")
    return {**json.loads(lines[-1][len("RESULT "):]), "steal_pct": steal}


def table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return "" if value is None else str(value)
