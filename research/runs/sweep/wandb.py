"""Sweeps on the W&B server: the pure W&B sweep file, and the one run ``wandb agent`` asks for."""

from __future__ import annotations

import ast
import dataclasses
import os
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from research.runs import layout
from research.runs.sweep.runner import Runner, SweepState, is_finished, sweep_dir_for
from research.runs.sweep.spec import SEED_PARAMETER, WANDB_KEYS, RunSpec, Sweep, SweepError, load_sweep


def wandb_config(sweep: Sweep, sweep_file: str | Path | None = None) -> dict[str, Any]:
    """The pure W&B sweep configuration: our keys removed, seeds as the ``seed`` parameter, command = sweep-agent."""
    sweep_file = str(sweep_file or sweep.path)
    out = {key: value for key, value in sweep.raw.items() if key in WANDB_KEYS and key not in ("command", "program")}
    out["name"] = sweep.name
    parameters = dict(sweep.parameters)
    parameters[SEED_PARAMETER] = {"values": list(sweep.seeds)} if len(sweep.seeds) > 1 else {"value": sweep.seeds[0]}
    out["parameters"] = parameters
    out["program"] = "research"  # informative; the command below is what the agent runs
    out["command"] = ["${env}", "research", "sweep-agent", sweep_file, "${args}"]
    if sweep.method == "grid" and sweep.run_cap is None:
        out.pop("run_cap", None)
    return out


def parse_agent_args(args: Iterable[str]) -> dict[str, Any]:
    """``["--a.b=1", "--c", "x"]`` -> ``{"a.b": 1, "c": "x"}``; values are parsed as YAML (numbers, lists, mappings)."""
    items = list(args)
    params: dict[str, Any] = {}
    i = 0
    while i < len(items):
        arg = items[i]
        if not arg.startswith("--"):
            raise SweepError(f"agent argument {arg!r}: expected --key=value")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
        elif i + 1 < len(items) and not items[i + 1].startswith("--"):
            key, text = arg[2:], items[i + 1]
            i += 1
        else:
            key, text = arg[2:], "true"
        params[key] = _agent_value(text)
        i += 1
    return params


def _agent_value(text: str) -> Any:
    """W&B formats values with Python's ``str``: ``1e-05``, ``True``, ``None``, ``[{'a': 1}]``; plain YAML is accepted."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def agent_run(path: str | Path, args: Sequence[str], root: str | Path = layout.SWEEPS_ROOT) -> int:
    """One run for ``wandb agent``: ``--key=value`` arguments -> override file -> ``research fit`` (return code)."""
    sweep = load_sweep(path)
    params = parse_agent_args(args)
    seed = params.pop(SEED_PARAMETER, sweep.seeds[0])
    unknown = sorted(set(params) - set(sweep.parameters))
    if unknown:
        raise SweepError(f"agent arguments {', '.join(unknown)} are not parameters of {path}")
    for key, spec in sweep.parameters.items():  # constants W&B may leave out
        if key not in params and "value" in spec:
            params[key] = spec["value"]
    spec = RunSpec({key: params[key] for key in sweep.parameters if key in params}, int(seed), sweep.varying_keys)
    sweep_dir = sweep_dir_for(sweep, root)
    if is_finished(sweep_dir / spec.run_id):  # W&B proposed a configuration already run: a fresh folder for this W&B run
        stamp = os.environ.get("WANDB_RUN_ID") or datetime.now().strftime("%Y%m%d%H%M%S")
        spec = dataclasses.replace(spec, folder=f"{spec.run_id}-{stamp}")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    runner = Runner(sweep, sweep_dir, SweepState(sweep_dir, sweep), dict(os.environ), quiet=False)
    return 0 if runner.execute(spec) else 1
