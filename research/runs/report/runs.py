"""Finding finished runs and single evaluations on disk, and reading their metrics, per-query values and settings."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from research.errors import ResearchError
from research.eval.metrics import parse_metric
from research.runs import layout
from research.runs.sweep.naming import config_label


@dataclass
class RunRecord:
    run_dir: Path
    run_id: str
    label: str
    params: dict[str, Any]
    seed: int | None
    metrics: dict[str, float]
    per_query: dict[str, dict[str, float]]
    config: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def resolve_source(source: str | Path, root: str | Path = layout.RUNS_ROOT) -> Path:
    """A folder of runs: the path itself, or ``<root>/sweeps/<name>``, or ``<root>/<name>``."""
    path = Path(source)
    if path.is_dir():
        return path
    sweeps = Path(root) / layout.SWEEPS_DIR
    for candidate in (sweeps / str(source), Path(root) / str(source)):
        if candidate.is_dir():
            return candidate
    if path.exists():
        raise ResearchError(f"no runs found: {source} is a file, not a folder of runs")
    if len(path.parts) > 1 or path.is_absolute():  # a path, not a name to look up
        raise ResearchError(f"no runs found: {source}: no such folder")
    names = sorted({p.name for folder in (sweeps, Path(root)) if folder.is_dir() for p in folder.iterdir()
                    if p.is_dir() and p.name != layout.SWEEPS_DIR})
    close = difflib.get_close_matches(str(source), names, n=1, cutoff=0.6)
    raise ResearchError(f"no runs found: no folder, sweep or run group named {str(source)!r} (looked in {sweeps}/ "
                        f"and {root}/)"
                        + (f"; did you mean {close[0]!r}?" if close else ""))


def _is_metric(name: str) -> bool:
    try:
        parse_metric(name)
    except ValueError:
        return False
    return True


def _read_metrics(path: Path) -> dict[str, float]:
    """The metric values of a ``metrics.json`` (its other entries, e.g. ``num_queries`` or ``split``, left out)."""
    return {k: float(v) for k, v in json.loads(path.read_text(encoding="utf-8")).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and _is_metric(k)}


def _load_run(run_dir: Path) -> RunRecord | None:
    metrics_path = run_dir / layout.EVAL_AFTER / layout.METRICS_FILE
    per_query_path = run_dir / layout.EVAL_AFTER / layout.PER_QUERY_FILE
    if not metrics_path.is_file() or not per_query_path.is_file():
        return None
    info_path = run_dir / layout.SWEEP_RUN_FILE
    config_path = run_dir / layout.CONFIG_FILE
    config = _flatten(yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}) if config_path.is_file() else {}
    seconds = None
    if info_path.is_file():
        finished = run_dir / layout.FINISHED_MARKER
        if not finished.is_file():
            return None  # a sweep run that did not finish (its eval may be from an earlier attempt)
        info = json.loads(info_path.read_text(encoding="utf-8"))
        params = info.get("swept") or info.get("params") or {}
        label, seed, run_id = info.get("label") or config_label(params), info.get("seed"), info.get("run_id", run_dir.name)
        seconds = json.loads(finished.read_text(encoding="utf-8")).get("seconds")
    else:
        params, label, run_id = {}, run_dir.parent.name, run_dir.name
        seed = config.get("seed_everything")
    metrics = _read_metrics(metrics_path)
    per_query = json.loads(per_query_path.read_text(encoding="utf-8"))
    return RunRecord(run_dir, run_id, label, params, seed, metrics, per_query, config, seconds)


def load_reference(spec: str) -> RunRecord:
    """``NAME=DIR``: one evaluation (``metrics.json`` + ``per_query.json`` in DIR, DIR/eval_after or DIR/eval)."""
    name, sep, folder = spec.partition("=")
    if not sep or not name or not folder:
        raise ResearchError(f"--reference {spec!r}: expected NAME=DIR")
    for candidate in (Path(folder), Path(folder) / layout.EVAL_AFTER, Path(folder) / layout.EVAL_DIR):
        if (candidate / layout.METRICS_FILE).is_file() and (candidate / layout.PER_QUERY_FILE).is_file():
            metrics = _read_metrics(candidate / layout.METRICS_FILE)
            per_query = json.loads((candidate / layout.PER_QUERY_FILE).read_text(encoding="utf-8"))
            return RunRecord(candidate, name, name, {}, None, metrics, per_query)
    raise ResearchError(f"--reference {spec!r}: no {layout.METRICS_FILE} + {layout.PER_QUERY_FILE} in {folder} "
                        f"(or its {layout.EVAL_AFTER}/, {layout.EVAL_DIR}/)")


def find_runs(source: str | Path, root: str | Path = layout.RUNS_ROOT) -> list[RunRecord]:
    """Finished runs under ``source`` (its own run folders and, one level down, ``<name>/<time>`` folders)."""
    base = resolve_source(source, root)
    candidates = [base] + sorted(p for p in base.iterdir() if p.is_dir())
    candidates += sorted(q for p in base.iterdir() if p.is_dir() for q in p.iterdir() if q.is_dir())
    runs = [run for run in map(_load_run, candidates) if run is not None]
    if not runs:
        raise ResearchError(f"no finished runs ({layout.EVAL_AFTER}/{layout.METRICS_FILE} + {layout.PER_QUERY_FILE}) "
                            f"under {base}")
    return runs
