"""Hyper-parameter sweeps in W&B's sweep format, run locally (grid, random) or by ``wandb agent``.

A sweep file is a W&B sweep configuration plus a few keys of ours::

    name: scifact-losses                    # the sweep's name: run folder runs/sweeps/<name>, W&B group
    method: grid                            # grid | random (offline); bayes needs `wandb agent`
    metric: {name: test/nDCG@10, goal: maximize}
    parameters:                             # dotted config keys of `research fit`
      model.init_args.loss.class_path:
        values: [research.losses.InfoNCE, research.losses.TripletLoss]
      model.init_args.lr:
        distribution: log_uniform_values    # random search only
        min: 1.0e-5
        max: 1.0e-4
    # ours:
    configs: [experiments/scifact/bi_encoder.yaml, experiments/sweeps/budget.yaml]   # base configs, in order
    seeds: [1, 2, 3]                        # every configuration runs once per seed
    seed_keys: [seed_everything, data.init_args.seed]   # the config keys a seed sets (default: seed_everything)
    fit_args: ["--evaluate_before_fit=false"]           # extra `research fit` arguments (optional)
    run_cap: 12                             # W&B's key: total runs (random search: required)
    random_seed: 0                          # random search: the sampler's seed
    keep_checkpoints: false                 # delete a run's checkpoints/ once it has finished (default true)

A parameter's value may also be a mapping of dotted keys (a *bundle*), e.g. a loss together with its data
setting: ``values: [{model.init_args.loss.class_path: research.losses.InfoNCE, data.init_args.num_negatives: 1}]``;
an optional ``name`` key (no dot) labels the bundle in run ids and reports instead of its joined values.

Offline (:func:`run_sweep`, ``research sweep FILE``): every run is ``research fit --config <configs...> --config
<override.yaml>`` in a subprocess, in ``runs/sweeps/<name>/<run id>``; the run id is deterministic (parameter values
and seed). A state file (``sweep_state.json``, written atomically) and an append-only ``sweep_events.jsonl`` record
what ran; a run folder holding ``FINISHED`` is never run again, a run interrupted mid-way restarts from its
``checkpoints/last.ckpt`` when there is one, else from scratch. Killing the sweep (SIGTERM, SIGINT or SIGKILL) also
ends its runs (a child process dies with the sweep), so a resumed sweep never runs a configuration twice at once.

Online: ``research sweep FILE --wandb-config OUT.yaml`` writes the pure W&B file (``seeds`` become a ``seed``
parameter, ``command`` calls ``research sweep-agent FILE ${args}``); ``wandb sweep OUT.yaml`` then
``wandb agent ENTITY/PROJECT/SWEEP_ID``. The agent passes ``--key=value`` arguments, which
:func:`agent_run` turns into the same override file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from research.errors import ResearchError
from research.io import read_yaml_file, yaml_location
from research.io import atomic_write, write_json

SWEEPS_ROOT = Path("runs") / "sweeps"
STATE_FILE = "sweep_state.json"
EVENTS_FILE = "sweep_events.jsonl"
FINISHED_MARKER = "FINISHED"
RUN_INFO_FILE = "sweep_run.json"
OVERRIDE_FILE = "override.yaml"
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"
FIT_PROGRAM = [sys.executable, "-m", "research.cli"]  # what runs `fit` (tests swap in a stand-in)
SEED_PARAMETER = "seed"  # the parameter name the W&B export gives the seeds
OUR_KEYS = ("configs", "seeds", "seed_keys", "fit_args", "random_seed", "keep_checkpoints")
WANDB_KEYS = ("name", "description", "method", "metric", "parameters", "program", "command", "run_cap",
              "early_terminate", "project", "entity")


class SweepError(ResearchError):
    """A sweep file is invalid, or a sweep cannot run offline."""


# ---------------------------------------------------------------- the sweep file
@dataclass
class Sweep:
    name: str
    method: str
    parameters: dict[str, dict[str, Any]]
    configs: list[str]
    seeds: list[int] = field(default_factory=lambda: [0])
    seed_keys: list[str] = field(default_factory=lambda: ["seed_everything"])
    metric: dict[str, str] | None = None
    fit_args: list[str] = field(default_factory=list)
    run_cap: int | None = None
    random_seed: int = 0
    keep_checkpoints: bool = True
    path: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def metric_name(self) -> str | None:
        return (self.metric or {}).get("name")

    @property
    def varying_keys(self) -> tuple[str, ...]:
        """The parameters that take more than one value (constants are W&B ``value:`` parameters)."""
        return tuple(key for key, spec in self.parameters.items()
                     if "distribution" in spec and spec["distribution"] != "constant"
                     or isinstance(spec.get("values"), list) and len(spec["values"]) > 1)


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file (see the module docstring)."""
    path = Path(path)
    raw = read_yaml_file(path, "sweep file")  # missing, non-UTF-8, YAML syntax: one line naming file and line
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: expected a mapping at the top level")
    unknown = sorted(set(raw) - set(OUR_KEYS) - set(WANDB_KEYS))
    if unknown:
        raise SweepError(f"{yaml_location(path, unknown[0])} unknown key(s) {', '.join(unknown)} (W&B keys: {', '.join(WANDB_KEYS)}; "
                         f"ours: {', '.join(OUR_KEYS)})")
    method = raw.get("method")
    if method not in ("grid", "random", "bayes"):
        raise SweepError(f"{yaml_location(path, 'method')} must be grid, random or bayes, got {method!r}")
    parameters = raw.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise SweepError(f"{yaml_location(path, 'parameters')} must be a non-empty mapping of dotted config keys")
    for key, spec in parameters.items():
        if not isinstance(spec, dict):
            raise SweepError(f"{yaml_location(path, f'parameters.{key}')} expected a mapping (values, value or distribution)")
        if key == SEED_PARAMETER:
            raise SweepError(f"{path}: parameter name {SEED_PARAMETER!r} is reserved: list seeds under 'seeds'")
    configs = raw.get("configs") or []
    if isinstance(configs, str):
        configs = [configs]
    if not configs:
        raise SweepError(f"{yaml_location(path, 'configs')} (the base `research fit` configs) is missing")
    for config in configs:
        if not Path(config).is_file():
            raise SweepError(f"{yaml_location(path, 'configs')} base config {config} not found (paths are relative to the working directory)")
    seeds = raw.get("seeds", [0])
    if isinstance(seeds, int):
        seeds = [seeds]
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise SweepError(f"{yaml_location(path, 'seeds')} must be a non-empty list of integers")
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"{yaml_location(path, 'seeds')} has duplicates")
    seed_keys = raw.get("seed_keys", ["seed_everything"])
    seed_keys = [seed_keys] if isinstance(seed_keys, str) else list(seed_keys)
    run_cap = raw.get("run_cap")
    if run_cap is not None and (not isinstance(run_cap, int) or run_cap < 1):
        raise SweepError(f"{yaml_location(path, 'run_cap')} must be a positive integer")
    name = str(raw.get("name") or path.stem)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise SweepError(f"{path}: sweep name {name!r} must be letters, digits, '.', '_' or '-'")
    metric = raw.get("metric")
    if metric is not None and (not isinstance(metric, dict) or "name" not in metric):
        raise SweepError(f"{yaml_location(path, 'metric')} must be a mapping with 'name' (and 'goal')")
    return Sweep(name=name, method=method, parameters=parameters, configs=[str(c) for c in configs], seeds=list(seeds),
                 seed_keys=seed_keys, metric=metric, fit_args=[str(a) for a in raw.get("fit_args") or []],
                 run_cap=run_cap, random_seed=int(raw.get("random_seed", 0)),
                 keep_checkpoints=bool(raw.get("keep_checkpoints", True)), path=path, raw=raw)


# ---------------------------------------------------------------- parameter values
BUNDLE_NAME = "name"  # the label key of a bundle (not a config key)


def _grid_values(key: str, spec: dict[str, Any]) -> list[Any]:
    if "values" in spec:
        values = spec["values"]
        if not isinstance(values, list) or not values:
            raise SweepError(f"parameter {key!r}: 'values' must be a non-empty list")
        return values
    if "value" in spec:
        return [spec["value"]]
    raise SweepError(f"parameter {key!r}: grid search needs 'values' or 'value' (distributions need method: random)")


def sample_value(key: str, spec: dict[str, Any], rng: random.Random) -> Any:
    """One draw from a W&B parameter spec (``values``/``value`` or a ``distribution``)."""
    if "value" in spec and "distribution" not in spec:
        return spec["value"]
    distribution = spec.get("distribution", "categorical" if "values" in spec else None)
    if distribution in ("categorical", "constant") or (distribution is None and "values" in spec):
        if distribution == "constant":
            return spec["value"]
        values = _grid_values(key, spec)
        weights = spec.get("probabilities")
        return rng.choices(values, weights=weights)[0] if weights else rng.choice(values)

    def bound(name: str) -> float:
        if name not in spec:
            raise SweepError(f"parameter {key!r}: distribution {distribution!r} needs {name!r}")
        return float(spec[name])

    def quantize(x: float) -> float:
        q = float(spec.get("q", 1.0))
        return round(x / q) * q

    if distribution == "int_uniform":
        return rng.randint(int(bound("min")), int(bound("max")))
    if distribution == "uniform":
        return rng.uniform(bound("min"), bound("max"))
    if distribution == "q_uniform":
        return quantize(rng.uniform(bound("min"), bound("max")))
    if distribution == "log_uniform":  # W&B: min/max are natural-log bounds
        return math.exp(rng.uniform(bound("min"), bound("max")))
    if distribution == "log_uniform_values":
        return math.exp(rng.uniform(math.log(bound("min")), math.log(bound("max"))))
    if distribution == "q_log_uniform_values":
        return quantize(math.exp(rng.uniform(math.log(bound("min")), math.log(bound("max")))))
    if distribution == "inv_log_uniform_values":
        return 1.0 / math.exp(rng.uniform(math.log(1.0 / bound("max")), math.log(1.0 / bound("min"))))
    if distribution == "normal":
        return rng.gauss(float(spec.get("mu", 0.0)), float(spec.get("sigma", 1.0)))
    if distribution == "q_normal":
        return quantize(rng.gauss(float(spec.get("mu", 0.0)), float(spec.get("sigma", 1.0))))
    if distribution == "log_normal":
        return math.exp(rng.gauss(float(spec.get("mu", 0.0)), float(spec.get("sigma", 1.0))))
    raise SweepError(f"parameter {key!r}: distribution {distribution!r} is not supported offline")


def _json_value(value: Any) -> Any:
    """Floats from a sampler rounded to 6 significant digits, so run ids and YAML stay readable and stable."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    return value


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: a configuration (parameter values) and a seed."""

    params: dict[str, Any]
    seed: int
    varying: tuple[str, ...] | None = None  # the keys that name the run (default: all)

    @property
    def swept(self) -> dict[str, Any]:
        """The values of the varying parameters (all parameters when none vary)."""
        keys = [k for k in (self.varying or ()) if k in self.params]
        return {k: self.params[k] for k in keys} if keys else dict(self.params)

    @property
    def run_id(self) -> str:
        return run_id(self.params, self.seed, self.swept)

    @property
    def config_key(self) -> str:
        return json.dumps(self.params, sort_keys=True, default=str)


def configurations(sweep: Sweep) -> list[dict[str, Any]]:
    """The sweep's configurations (without seeds), in a deterministic order."""
    if sweep.method == "bayes":
        raise SweepError("bayes search needs the W&B server: export the sweep with `research sweep FILE --wandb-config "
                         "OUT.yaml`, then `wandb sweep OUT.yaml` and `wandb agent SWEEP_ID` (use wandb agent)")
    keys = list(sweep.parameters)
    if sweep.method == "grid":
        grids = [_grid_values(key, sweep.parameters[key]) for key in keys]
        configs = [dict(zip(keys, combo)) for combo in itertools.product(*grids)]
    else:
        if sweep.run_cap is None:
            raise SweepError("random search needs 'run_cap' (the total number of runs) in the sweep file")
        count = math.ceil(sweep.run_cap / len(sweep.seeds))
        rng = random.Random(sweep.random_seed)
        configs = [{key: _json_value(sample_value(key, sweep.parameters[key], rng)) for key in keys} for _ in range(count)]
    unique: dict[str, dict[str, Any]] = {}
    for config in configs:
        unique.setdefault(json.dumps(config, sort_keys=True, default=str), config)
    return list(unique.values())


def expand_runs(sweep: Sweep) -> list[RunSpec]:
    """Every run: each seed over all configurations (seed-major, so early results cover every configuration)."""
    configs = configurations(sweep)
    runs = [RunSpec(config, seed, sweep.varying_keys) for seed in sweep.seeds for config in configs]
    return runs[: sweep.run_cap] if sweep.run_cap is not None else runs


# ---------------------------------------------------------------- run ids and override files
def short_key(key: str) -> str:
    """``model.init_args.loss.class_path`` -> ``loss``; ``trainer.max_steps`` -> ``max_steps``."""
    parts = [p for p in key.split(".") if p not in ("init_args", "class_path", "model", "data", "trainer")]
    return parts[-1] if parts else key.split(".")[-1]


def short_value(value: Any) -> str:
    """``research.losses.InfoNCE`` -> ``InfoNCE``; floats in short form; a bundle by its own short values."""
    if isinstance(value, dict):
        if BUNDLE_NAME in value:
            return str(value[BUNDLE_NAME])
        return "+".join(short_value(v) for v in value.values())
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    last = text.rsplit(".", 1)[-1]
    if "." in text and re.fullmatch(r"[A-Za-z_][\w.]*", text) and last[:1].isupper():
        return last
    return text


def config_label(params: dict[str, Any]) -> str:
    """A short, readable name of a configuration: ``InfoNCE`` for one parameter, ``loss=InfoNCE lr=1e-05`` for many."""
    if len(params) == 1:
        return short_value(next(iter(params.values())))
    return " ".join(f"{short_key(k)}={short_value(v)}" for k, v in params.items())


def run_id(params: dict[str, Any], seed: int, named: dict[str, Any] | None = None) -> str:
    """Deterministic run id: a readable slug (of ``named``, default all values), the seed and a hash of all values."""
    digest = hashlib.sha1(json.dumps({"params": params, "seed": seed}, sort_keys=True, default=str).encode()).hexdigest()
    slug = "_".join(short_value(v) for v in (params if named is None else named).values())
    slug = re.sub(r"[^A-Za-z0-9.=+-]+", "-", slug).strip("-")[:48] or "run"
    return f"{slug}-s{seed}-{digest[:8]}"


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SweepError(f"config key {key!r} conflicts with another parameter setting {part!r}")
        node = child
    node[parts[-1]] = value


def override_config(params: dict[str, Any], seed: int | None, seed_keys: Sequence[str]) -> dict[str, Any]:
    """The nested YAML that sets each dotted parameter (bundles expanded) and the seed keys."""
    tree: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict) and all("." in k for k in value if k != BUNDLE_NAME):  # a bundle of dotted keys
            for sub_key, sub_value in value.items():
                if sub_key != BUNDLE_NAME:
                    _set_dotted(tree, sub_key, sub_value)
        else:
            _set_dotted(tree, key, value)
    if seed is not None:
        for key in seed_keys:
            _set_dotted(tree, key, seed)
    return tree


def fit_command(configs: Sequence[str], override: Path, run_dir: Path, name: str, fit_args: Sequence[str] = (),
                ckpt_path: Path | None = None) -> list[str]:
    """``python -m research.cli fit --config ... --config override.yaml --run_dir D --name N [--ckpt_path C]``."""
    command = [*FIT_PROGRAM, "fit"]
    for config in configs:
        command += ["--config", str(config)]
    command += ["--config", str(override), "--run_dir", str(run_dir), "--name", name, *fit_args]
    if ckpt_path is not None:
        command += ["--ckpt_path", str(ckpt_path)]
    return command


# A child sweep run dies with the sweep (SIGKILL included): PR_SET_PDEATHSIG survives exec.
_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(137)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def _launch(command: list[str], log, env: dict[str, str]) -> subprocess.Popen:
    if sys.platform.startswith("linux"):
        command = [sys.executable, "-c", _LAUNCHER, str(os.getpid()), *command]
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)


# ---------------------------------------------------------------- state
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class SweepState:
    """``sweep_state.json`` (atomic rewrites) and ``sweep_events.jsonl`` (appends), guarded by one lock."""

    def __init__(self, sweep_dir: Path, sweep: Sweep) -> None:
        self.dir = sweep_dir
        self.path = sweep_dir / STATE_FILE
        self.events = sweep_dir / EVENTS_FILE
        self._lock = threading.Lock()
        if self.path.is_file():
            self.data = json.loads(self.path.read_text(encoding="utf-8"))
        else:
            self.data = {"sweep": sweep.name, "file": str(sweep.path), "method": sweep.method, "created": _now(), "runs": {}}
        self.data["sweep_file_sha1"] = hashlib.sha1(sweep.path.read_bytes()).hexdigest() if sweep.path else None

    def run(self, rid: str) -> dict[str, Any]:
        return self.data["runs"].get(rid, {})

    def update(self, rid: str, event: str | None = None, **fields: Any) -> None:
        with self._lock:
            entry = self.data["runs"].setdefault(rid, {"attempts": 0})
            entry.update(fields)
            self.data["updated"] = _now()
            write_json(self.path, self.data)
            if event:
                with open(self.events, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps({"time": _now(), "pid": os.getpid(), "event": event, "run": rid,
                                             **{k: v for k, v in fields.items() if k in ("returncode", "seconds", "resume_from")}}) + "\n")

    def event(self, event: str, **fields: Any) -> None:
        with self._lock, open(self.events, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"time": _now(), "pid": os.getpid(), "event": event, **fields}) + "\n")


@contextlib.contextmanager
def _exclusive(sweep_dir: Path):
    """One ``research sweep`` per sweep folder at a time (an flock, released when the process dies)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    handle = open(sweep_dir / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise SweepError(f"another `research sweep` is running in {sweep_dir}") from None
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def is_finished(run_dir: Path) -> bool:
    return (run_dir / FINISHED_MARKER).is_file()


# ---------------------------------------------------------------- running
@dataclass
class SweepResult:
    sweep_dir: Path
    finished: list[str]
    skipped: list[str]
    failed: list[str]
    pending: list[str]


class _Runner:
    def __init__(self, sweep: Sweep, sweep_dir: Path, state: SweepState, env: dict[str, str], quiet: bool) -> None:
        self.sweep, self.sweep_dir, self.state, self.env, self.quiet = sweep, sweep_dir, state, env, quiet
        self.stop = threading.Event()
        self.children: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"[sweep {self.sweep.name}] {text}", flush=True)

    def execute(self, spec: RunSpec) -> bool:
        """Run one configuration to the end; True when it finished (``FINISHED`` written)."""
        rid = spec.run_id
        run_dir = self.sweep_dir / rid
        if self.stop.is_set():
            return False
        run_dir.mkdir(parents=True, exist_ok=True)
        override = run_dir / OVERRIDE_FILE
        with atomic_write(override) as handle:
            yaml.safe_dump(override_config(spec.params, spec.seed, self.sweep.seed_keys), handle, sort_keys=False)
        checkpoint = run_dir / LAST_CHECKPOINT
        resume = checkpoint if checkpoint.is_file() else None
        command = fit_command(self.sweep.configs, override, run_dir, self.sweep.name, self.sweep.fit_args, resume)
        write_json(run_dir / RUN_INFO_FILE, {"sweep": self.sweep.name, "sweep_file": str(self.sweep.path),
                                             "run_id": rid, "params": spec.params, "swept": spec.swept, "seed": spec.seed,
                                             "label": config_label(spec.swept), "command": command})
        attempts = self.state.run(rid).get("attempts", 0) + 1
        self.state.update(rid, "start", status="running", params=spec.params, seed=spec.seed, attempts=attempts,
                          started=_now(), resume_from=str(resume) if resume else None, pid=os.getpid())
        self.say(f"start {rid} (attempt {attempts}{', resuming from ' + str(resume) if resume else ''})")
        started = time.perf_counter()
        with open(run_dir / "stdout.log", "a", encoding="utf-8") as log:
            log.write(f"\n===== attempt {attempts} at {_now()}: {' '.join(command)}\n")
            log.flush()
            with self._lock:
                if self.stop.is_set():
                    return False
                process = _launch(command, log, self.env)
                self.children[rid] = process
            returncode = process.wait()
            with self._lock:
                self.children.pop(rid, None)
        seconds = round(time.perf_counter() - started, 1)
        metrics_path = run_dir / "eval_after" / "metrics.json"
        if returncode == 0 and metrics_path.is_file():
            metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
            write_json(run_dir / FINISHED_MARKER, {"finished": _now(), "seconds": seconds, "attempts": attempts,
                                                   "metrics": {k: v for k, v in metrics.items() if isinstance(v, float)}})
            self.state.update(rid, "finish", status="finished", returncode=0, seconds=seconds, finished=_now())
            if not self.sweep.keep_checkpoints:
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            self.say(f"finished {rid} in {seconds:.0f} s")
            return True
        status = "interrupted" if self.stop.is_set() else "failed"
        if returncode == 0 and status == "failed":
            returncode = "exit 0 without eval_after/metrics.json (set test_after_fit: true)"
        self.state.update(rid, status, status=status, returncode=returncode, seconds=seconds)
        self.say(f"{status} {rid} (return code {returncode}; log: {run_dir / 'stdout.log'})")
        return False

    def terminate(self, grace: float = 30.0) -> None:
        self.stop.set()
        with self._lock:
            children = list(self.children.values())
        for process in children:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        deadline = time.monotonic() + grace
        for process in children:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()


def sweep_dir_for(sweep: Sweep, root: str | Path = SWEEPS_ROOT) -> Path:
    return Path(root) / sweep.name


def run_sweep(path: str | Path, parallel: int = 1, max_runs: int | None = None, root: str | Path = SWEEPS_ROOT,
              quiet: bool = False, retry_failed: bool = True) -> SweepResult:
    """Run the grid/random sweep of ``path`` locally, skipping finished runs (see the module docstring)."""
    sweep = load_sweep(path)
    runs = expand_runs(sweep)
    if parallel < 1:
        raise SweepError("--parallel must be >= 1")
    sweep_dir = sweep_dir_for(sweep, root)
    with _exclusive(sweep_dir):
        state = SweepState(sweep_dir, sweep)
        env = dict(os.environ)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.setdefault("PYTHONUNBUFFERED", "1")  # the run log shows progress as it happens
        if parallel > 1 and "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
        runner = _Runner(sweep, sweep_dir, state, env, quiet)
        skipped = [spec.run_id for spec in runs if is_finished(sweep_dir / spec.run_id)]
        todo = [spec for spec in runs if spec.run_id not in set(skipped)]
        if not retry_failed:
            todo = [spec for spec in todo if state.run(spec.run_id).get("status") != "failed"]
        for rid in skipped:
            if state.run(rid).get("status") != "finished":
                state.update(rid, None, status="finished")
        if max_runs is not None:
            todo = todo[:max_runs]
        state.event("sweep_start", runs=len(runs), finished_before=len(skipped), to_run=len(todo), parallel=parallel)
        runner.say(f"{len(runs)} runs: {len(skipped)} already finished, {len(todo)} to run now "
                   f"({parallel} at a time) in {sweep_dir}")
        finished: list[str] = []
        failed: list[str] = []

        def on_signal(signum, _frame):
            runner.say(f"received signal {signum}: stopping the running runs")
            state.event("sweep_signal", signal=signum)
            runner.terminate()
            raise KeyboardInterrupt

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)} \
            if threading.current_thread() is threading.main_thread() else {}
        try:
            with ThreadPoolExecutor(max_workers=parallel) as pool:
                futures = {pool.submit(runner.execute, spec): spec for spec in todo}
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                    for future in done:
                        (finished if future.result() else failed).append(futures[future].run_id)
        except KeyboardInterrupt:
            runner.terminate()
            state.event("sweep_stop")
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        remaining = [spec.run_id for spec in runs if not is_finished(sweep_dir / spec.run_id)]
        state.event("sweep_end", finished=len(finished), failed=len(failed), remaining=len(remaining))
        return SweepResult(sweep_dir, finished, skipped, failed, remaining)


# ---------------------------------------------------------------- W&B
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
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def agent_run(path: str | Path, args: Sequence[str], root: str | Path = SWEEPS_ROOT) -> int:
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
    rid = spec.run_id
    if is_finished(sweep_dir / rid):  # W&B proposed a configuration already run: a fresh folder for this W&B run
        rid = f"{rid}-{os.environ.get('WANDB_RUN_ID') or datetime.now().strftime('%Y%m%d%H%M%S')}"
    sweep_dir.mkdir(parents=True, exist_ok=True)
    state = SweepState(sweep_dir, sweep)
    runner = _Runner(sweep, sweep_dir, state, dict(os.environ), quiet=False)
    spec_run = _AgentSpec(spec.params, spec.seed, spec.varying, rid)
    return 0 if runner.execute(spec_run) else 1


@dataclass(frozen=True)
class _AgentSpec(RunSpec):
    forced_id: str = ""

    @property
    def run_id(self) -> str:  # type: ignore[override]
        return self.forced_id or super().run_id


def status_table(path: str | Path, root: str | Path = SWEEPS_ROOT) -> list[dict[str, Any]]:
    """Each run of a sweep with its status, attempts and seconds (for ``research sweep FILE --status``)."""
    sweep = load_sweep(path)
    sweep_dir = sweep_dir_for(sweep, root)
    state = json.loads((sweep_dir / STATE_FILE).read_text()) if (sweep_dir / STATE_FILE).is_file() else {"runs": {}}
    rows = []
    for spec in expand_runs(sweep):
        entry = state["runs"].get(spec.run_id, {})
        status = "finished" if is_finished(sweep_dir / spec.run_id) else entry.get("status", "pending")
        rows.append({"run": spec.run_id, "label": config_label(spec.swept), "seed": spec.seed, "status": status,
                     "attempts": entry.get("attempts", 0), "seconds": entry.get("seconds")})
    return rows
