"""``research sweep``, ``research sweep-agent``, ``research report`` and ``research reproduce``.

    research sweep experiments/sweeps/scifact_losses.yaml [--parallel N] [--max-runs N] [--status]
    research sweep experiments/sweeps/scifact_losses.yaml --wandb-config wandb_sweep.yaml   # for `wandb sweep`
    research sweep experiments/sweeps/zelo_labels_losses_dev.yaml --set data.init_args.groups_file=runs/g.jsonl
    research sweep-agent experiments/sweeps/scifact_losses.yaml --key=value ...             # what `wandb agent` runs
    research report runs/sweeps/scifact-losses --baseline InfoNCE --out experiments/results/scifact-losses
    research reproduce experiments/baselines/scifact.yaml [--only NAME]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from research.runs import layout


def cmd_sweep(args: argparse.Namespace) -> None:
    import yaml

    from research.cli.lightning import check_fit_arguments
    from research.io import atomic_write
    from research.runs.sweep import load_sweep, parse_set, run_sweep, status_table, wandb_config

    constants = parse_set(args.set or [])
    if args.wandb_config:
        sweep = load_sweep(args.file, constants)
        out = Path(args.wandb_config)
        with atomic_write(out) as handle:
            yaml.safe_dump(wandb_config(sweep, args.file), handle, sort_keys=False)
        print(f"wrote {out}; then: wandb sweep {out}  and  wandb agent <entity>/<project>/<sweep id>")
        return
    if args.status:
        rows = status_table(args.file, root=args.root, check=check_fit_arguments, constants=constants)
        for row in rows:
            seconds = "" if row["seconds"] is None else f"{row['seconds']:.0f} s"
            print(f"{row['status']:<12} attempts {row['attempts']}  {row['run']:<48} {seconds}".rstrip())
            if row["reason"]:
                print(f"{'':<12} reason: {row['reason']}")
        done = sum(row["status"] == "finished" for row in rows)
        invalid = sum(row["status"] == "invalid" for row in rows)
        print(f"{done}/{len(rows)} finished" + (f", {invalid} invalid (fix the sweep file: they would fail at the start)"
                                                if invalid else ""))
        return
    result = run_sweep(args.file, parallel=args.parallel, max_runs=args.max_runs, root=args.root,
                       retry_failed=not args.skip_failed, check=check_fit_arguments, constants=constants)
    print(f"sweep {result.sweep_dir}: {len(result.finished)} finished now, {len(result.skipped)} were already finished, "
          f"{len(result.failed)} failed, {len(result.pending)} not finished")
    if result.failed:
        sys.exit(1)


def cmd_sweep_agent(args: argparse.Namespace) -> None:
    from research.runs.sweep import agent_run

    code = agent_run(args.file, args.overrides, root=args.root)
    if code:
        sys.exit(code)


def cmd_report(args: argparse.Namespace) -> None:
    from research.runs.report import make_report

    make_report(args.source, baseline=args.baseline, metrics=args.metrics, out=args.out, permutations=args.permutations,
                root=args.root, title=args.title, references=args.reference or (), one_factor=args.one_factor)


def cmd_reproduce(args: argparse.Namespace) -> None:
    from research.runs.reproduce import reproduce

    code = reproduce(args.file, only=args.only, out=args.out, table=args.table, reuse=args.reuse, dry_run=args.dry_run,
                     include_disabled=args.all, strict=args.strict)
    if code:
        sys.exit(code)


def register(sub) -> None:
    p = sub.add_parser("sweep", help="run a W&B-format sweep file locally (grid/random), resumable")
    p.set_defaults(func=cmd_sweep)
    p.add_argument("file", help="sweep YAML (W&B sweep format + configs/seeds)")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time (default 1)")
    p.add_argument("--max-runs", type=int, default=None, help="start at most N unfinished runs in this invocation")
    p.add_argument("--root", default=str(layout.SWEEPS_ROOT),
                   help=f"where sweep folders live (default {layout.SWEEPS_ROOT})")
    p.add_argument("--status", action="store_true", help="list the runs and their state, run nothing")
    p.add_argument("--skip-failed", action="store_true", help="do not retry runs that failed before")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=None,
                   help="set a constant parameter (a dotted config key; VALUE parsed as YAML), e.g. a file another "
                        "command made; part of every run id (default: none)")
    p.add_argument("--wandb-config", metavar="OUT", help="write the pure W&B sweep file for `wandb sweep` and exit")

    p = sub.add_parser("sweep-agent", help="one sweep run from `wandb agent` (--key=value arguments)")
    p.set_defaults(func=cmd_sweep_agent)
    p.add_argument("file", help="the sweep YAML the W&B sweep was exported from")
    p.add_argument("--root", default=str(layout.SWEEPS_ROOT), help="where sweep folders live")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="--key=value parameter values from the agent")

    p = sub.add_parser("report", help="table (CSV, markdown), significance tests and plots of finished runs")
    p.set_defaults(func=cmd_report)
    p.add_argument("source", help="a sweep folder, a folder of run folders, or a sweep/group name")
    p.add_argument("--baseline", default=None, help="configuration label (e.g. InfoNCE) or run id to test against")
    p.add_argument("--metrics", nargs="+", default=None, help="metrics (default: all in metrics.json)")
    p.add_argument("--out", default=None, help=f"output folder (default: <source>/{layout.REPORT_DIR})")
    p.add_argument("--permutations", type=int, default=10000, help="paired randomization test samples")
    p.add_argument("--root", default=str(layout.RUNS_ROOT),
                   help=f"where names are looked up ({layout.SWEEPS_ROOT}/<name>, {layout.RUNS_ROOT}/<name>)")
    p.add_argument("--title", default=None, help="report title (default: the source folder and its counts)")
    p.add_argument("--one-factor", action="store_true",
                   help="also test every pair of configurations that differ in one parameter only (factorial sweeps)")
    p.add_argument("--reference", action="append", metavar="NAME=DIR",
                   help="add one evaluation (DIR with metrics.json + per_query.json), e.g. zero-shot=runs/x/eval")

    p = sub.add_parser("reproduce", help="run the baseline rows of a file, compare with the expected values")
    p.set_defaults(func=cmd_reproduce)
    p.add_argument("file", help="baselines YAML, e.g. experiments/baselines/scifact.yaml")
    p.add_argument("--only", nargs="+", default=None,
                   help="run only these rows and the rows they consume, consumed first (disabled rows included)")
    p.add_argument("--all", action="store_true", help="run disabled rows too")
    p.add_argument("--out", default=None,
                   help=f"folder for the rows' outputs (default {layout.REPRODUCE_ROOT}/<file stem>)")
    p.add_argument("--table", default=None, help="also write the markdown table here (and its results JSON beside it)")
    p.add_argument("--reuse", action="store_true",
                   help="score a row's existing output instead of deleting it and running the row again")
    p.add_argument("--strict", action="store_true", help="also fail on a metric that has no expected value")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
