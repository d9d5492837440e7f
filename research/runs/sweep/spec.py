"""The sweep file: its schema and checks, and the runs it stands for (grid products, random draws, seeds)."""

from __future__ import annotations

import itertools
import json
import math
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from research.errors import ResearchError
from research.io import read_yaml_file, yaml_location
from research.runs.sweep.naming import BUNDLE_NAME, run_id

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
    constants: dict[str, Any] = field(default_factory=dict)  # research sweep --set (already in ``parameters``)

    @property
    def metric_name(self) -> str | None:
        return (self.metric or {}).get("name")

    @property
    def varying_keys(self) -> tuple[str, ...]:
        """The parameters that take more than one value (constants are W&B ``value:`` parameters)."""
        return tuple(key for key, spec in self.parameters.items()
                     if "distribution" in spec and spec["distribution"] != "constant"
                     or isinstance(spec.get("values"), list) and len(spec["values"]) > 1)


def load_sweep(path: str | Path, constants: Mapping[str, Any] | None = None) -> Sweep:
    """Read and check a sweep file (see :mod:`research.runs.sweep`).

    ``constants`` (``research sweep --set KEY=VALUE``) add or replace constant parameters, e.g. a path another command
    made; a swept parameter cannot be set. Constants are part of every run id, so another value never reuses a run."""
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
    parameters = dict(parameters)
    for key, value in (constants or {}).items():
        spec = parameters.get(key, {})
        if isinstance(spec.get("values"), list) and len(spec["values"]) > 1 or "distribution" in spec:
            raise SweepError(f"--set {key}: {yaml_location(path, f'parameters.{key}')} sweeps this parameter; "
                             f"--set only sets constants")
        parameters[key] = {"value": value}
    return Sweep(name=name, method=method, parameters=parameters, configs=[str(c) for c in configs], seeds=list(seeds),
                 seed_keys=seed_keys, metric=metric, fit_args=[str(a) for a in raw.get("fit_args") or []],
                 run_cap=run_cap, random_seed=int(raw.get("random_seed", 0)),
                 keep_checkpoints=bool(raw.get("keep_checkpoints", True)), path=path, raw=raw,
                 constants=dict(constants or {}))


def parse_set(assignments: Iterable[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` (``research sweep --set``) -> ``{"a.b": 1, "c": "x"}``; values are parsed as YAML."""
    constants: dict[str, Any] = {}
    for text in assignments:
        key, sep, value = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SweepError(f"--set {text!r}: expected KEY=VALUE (a dotted config key)")
        if key in constants:
            raise SweepError(f"--set {key}: given twice")
        constants[key] = _yaml_value(value) if value else ""
    return constants


def _yaml_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SweepError(f"--set value {text!r} is not YAML: {err}") from None


# ---------------------------------------------------------------- parameter values
def _grid_values(key: str, spec: dict[str, Any]) -> list[Any]:
    if "values" in spec:
        values = spec["values"]
        if not isinstance(values, list) or not values:
            raise SweepError(f"parameter {key!r}: 'values' must be a non-empty list")
        return values
    if "value" in spec:
        return [spec["value"]]
    raise SweepError(f"parameter {key!r}: grid search needs 'values' or 'value' (distributions need method: random)")


Sampler = Callable[[str, dict[str, Any], random.Random], Any]  # (parameter key, its spec, rng) -> one value


def _bound(key: str, spec: dict[str, Any], name: str) -> float:
    if name not in spec:
        raise SweepError(f"parameter {key!r}: distribution {spec.get('distribution')!r} needs {name!r}")
    return float(spec[name])


def _quantized(sampler: Sampler) -> Sampler:
    def draw(key: str, spec: dict[str, Any], rng: random.Random) -> float:
        q = float(spec.get("q", 1.0))
        return round(sampler(key, spec, rng) / q) * q
    return draw


def _exp(sampler: Sampler) -> Sampler:
    return lambda key, spec, rng: math.exp(sampler(key, spec, rng))


def _categorical(key: str, spec: dict[str, Any], rng: random.Random) -> Any:
    values = _grid_values(key, spec)
    weights = spec.get("probabilities")
    return rng.choices(values, weights=weights)[0] if weights else rng.choice(values)


def _uniform(key: str, spec: dict[str, Any], rng: random.Random) -> float:
    return rng.uniform(_bound(key, spec, "min"), _bound(key, spec, "max"))


def _log_uniform_exponent(key: str, spec: dict[str, Any], rng: random.Random) -> float:
    return rng.uniform(math.log(_bound(key, spec, "min")), math.log(_bound(key, spec, "max")))


def _inv_log_uniform_values(key: str, spec: dict[str, Any], rng: random.Random) -> float:
    low = math.log(1.0 / _bound(key, spec, "max"))
    return 1.0 / math.exp(rng.uniform(low, math.log(1.0 / _bound(key, spec, "min"))))


def _normal(key: str, spec: dict[str, Any], rng: random.Random) -> float:
    return rng.gauss(float(spec.get("mu", 0.0)), float(spec.get("sigma", 1.0)))


# W&B's distributions by name; as in W&B, log_uniform's min/max are natural-log bounds, the *_values ones values.
SAMPLERS: dict[str, Sampler] = {
    "constant": lambda key, spec, rng: spec["value"],
    "categorical": _categorical,
    "int_uniform": lambda key, spec, rng: rng.randint(int(_bound(key, spec, "min")), int(_bound(key, spec, "max"))),
    "uniform": _uniform,
    "q_uniform": _quantized(_uniform),
    "log_uniform": _exp(_uniform),
    "log_uniform_values": _exp(_log_uniform_exponent),
    "q_log_uniform_values": _quantized(_exp(_log_uniform_exponent)),
    "inv_log_uniform_values": _inv_log_uniform_values,
    "normal": _normal,
    "q_normal": _quantized(_normal),
    "log_normal": _exp(_normal),
}


def sample_value(key: str, spec: dict[str, Any], rng: random.Random) -> Any:
    """One draw from a W&B parameter spec (``values``/``value`` or a ``distribution``)."""
    if "value" in spec and "distribution" not in spec:
        return spec["value"]
    distribution = spec.get("distribution", "categorical" if "values" in spec else None)
    sampler = SAMPLERS.get(distribution) if isinstance(distribution, str) else None
    if sampler is None:
        raise SweepError(f"parameter {key!r}: distribution {distribution!r} is not supported offline")
    return sampler(key, spec, rng)


def _json_value(value: Any) -> Any:
    """Floats from a sampler rounded to 6 significant digits, so run ids and YAML stay readable and stable."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    return value


# ---------------------------------------------------------------- the runs
@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: a configuration (parameter values) and a seed."""

    params: dict[str, Any]
    seed: int
    varying: tuple[str, ...] | None = None  # the keys that name the run (default: all)
    # A W&B agent given a configuration that already finished runs it again in a folder of its own.
    folder: str | None = None

    @property
    def swept(self) -> dict[str, Any]:
        """The values of the varying parameters (all parameters when none vary)."""
        keys = [k for k in (self.varying or ()) if k in self.params]
        return {k: self.params[k] for k in keys} if keys else dict(self.params)

    @property
    def run_id(self) -> str:
        return self.folder or run_id(self.params, self.seed, self.swept)


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


# ---------------------------------------------------------------- the override file
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
