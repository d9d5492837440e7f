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
``research sweep FILE --set KEY=VALUE`` adds or replaces a constant parameter (e.g. a file another command made);
constants are hashed into the run ids, so another value never reuses a finished run.

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

Modules: :mod:`.spec` the sweep file and its runs, :mod:`.naming` run ids and labels, :mod:`.runner` the offline
runner, :mod:`.wandb` the W&B export and agent. The names inside the folders are :mod:`research.runs.layout`'s.
"""

from research.runs.sweep.naming import BUNDLE_NAME, config_label, run_id, short_key, short_value
from research.runs.sweep.runner import (
    Runner,
    SweepResult,
    SweepState,
    fit_command,
    is_finished,
    run_sweep,
    status_table,
    sweep_dir_for,
)
from research.runs.sweep.spec import (
    SAMPLERS,
    SEED_PARAMETER,
    RunSpec,
    Sweep,
    SweepError,
    configurations,
    expand_runs,
    load_sweep,
    override_config,
    parse_set,
    sample_value,
)
from research.runs.sweep.wandb import agent_run, parse_agent_args, wandb_config

__all__ = [
    "BUNDLE_NAME", "SAMPLERS", "SEED_PARAMETER", "RunSpec", "Runner", "Sweep", "SweepError", "SweepResult",
    "SweepState", "agent_run", "config_label", "configurations", "expand_runs", "fit_command", "is_finished",
    "load_sweep", "override_config", "parse_agent_args", "parse_set", "run_id", "run_sweep", "sample_value", "short_key",
    "short_value", "status_table", "sweep_dir_for", "wandb_config",
]
