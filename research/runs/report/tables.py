"""A report's tables: ``report.csv`` (one row per configuration), ``runs.csv`` (one per run) and ``report.md``."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from research.io import atomic_write
from research.runs import layout
from research.runs.report.runs import RunRecord
from research.runs.report.summary import ConfigSummary, FactorComparison

# The settings that fix a run's budget: the markdown lists those every run shares.
BUDGET_KEYS = (
    "model.init_args.model", "data.init_args.data", "trainer.max_steps", "trainer.max_epochs", "trainer.precision",
    "data.init_args.batch_size", "model.init_args.query_max_length", "model.init_args.document_max_length",
    "model.init_args.lr", "model.init_args.temperature", "model.init_args.warmup_ratio", "data.init_args.num_negatives",
    "trainer.accumulate_grad_batches", "evaluate_before_fit",
)


def _fmt(value: float, digits: int = 4) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _fmt_p(value: float) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value:.2e}" if value < 1e-3 else f"{value:.3f}"


def fixed_settings(runs: Sequence[RunRecord]) -> tuple[dict[str, Any], list[str]]:
    """The budget keys equal in every run, and those that differ."""
    fixed, varying = {}, []
    for key in BUDGET_KEYS:
        values = {json.dumps(run.config.get(key), default=str) for run in runs if run.config}
        if len(values) == 1:
            value = json.loads(values.pop())
            if value is not None:
                fixed[key] = value
        elif len(values) > 1:
            varying.append(key)
    return fixed, varying


def write_csv(path: Path, summaries: Sequence[ConfigSummary], metrics: Sequence[str], param_keys: Sequence[str]) -> None:
    header = ["configuration", *param_keys, "runs", "seeds"]
    for metric in metrics:
        header += [f"{metric} mean", f"{metric} std", f"{metric} delta", f"{metric} p_ttest", f"{metric} p_perm",
                   f"{metric} p_ttest_holm", f"{metric} p_perm_holm"]
    with atomic_write(path) as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        for s in summaries:
            row = [s.label, *[s.params.get(k, "") for k in param_keys], len(s.runs), " ".join(map(str, s.seeds))]
            for metric in metrics:
                test = s.tests.get(metric, {})
                row += [f"{s.mean[metric]:.6f}", "" if math.isnan(s.std[metric]) else f"{s.std[metric]:.6f}"]
                row += ["" if k not in test or math.isnan(test[k]) else f"{test[k]:.6g}"
                        for k in ("delta", "p_ttest", "p_perm", "p_ttest_holm", "p_perm_holm")]
            writer.writerow(row)


def write_one_factor_csv(path: Path, comparisons: Sequence[FactorComparison], metrics: Sequence[str]) -> None:
    header = ["parameter", "first", "second", "fixed"]
    for metric in metrics:
        header += [f"{metric} delta", f"{metric} p_ttest", f"{metric} p_perm", f"{metric} p_ttest_holm",
                   f"{metric} p_perm_holm", f"{metric} queries"]
    with atomic_write(path) as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        for c in comparisons:
            row = [c.parameter, c.first.label, c.second.label, " ".join(f"{k}={v}" for k, v in c.fixed.items())]
            for metric in metrics:
                test = c.tests[metric]
                row += [f"{test[k]:.6g}" for k in ("delta", "p_ttest", "p_perm", "p_ttest_holm", "p_perm_holm")]
                row.append(test["queries"])
            writer.writerow(row)


def one_factor_markdown(comparisons: Sequence[FactorComparison], primary: str, permutations: int) -> list[str]:
    """The section of ``report.md`` for :func:`~research.runs.report.summary.one_factor_comparisons`."""
    lines = ["", f"## One change at a time ({primary})", "",
             "| changed | from | to | others fixed at | Δ (to − from) | p (t-test) | p (perm.) | p (perm., Holm) |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for c in comparisons:
        test = c.tests[primary]
        fixed = ", ".join(f"{k}={v}" for k, v in c.fixed.items()) or "—"
        lines.append(f"| {c.parameter} | {c.first.label} | {c.second.label} | {fixed} | {test['delta']:+.4f} | "
                     f"{_fmt_p(test['p_ttest'])} | {_fmt_p(test['p_perm'])} | {_fmt_p(test['p_perm_holm'])} |")
    queries = comparisons[0].tests[primary]["queries"] if comparisons else 0
    lines += ["", f"- Every pair of configurations that differ in one parameter only, paired over the {queries} queries "
                  f"(per-query values averaged over seeds; randomization test with {permutations:,} sign flips or "
                  f"exact); Holm over the {len(comparisons)} comparisons; every metric in {layout.ONE_FACTOR_CSV}."]
    return lines


def write_runs_csv(path: Path, runs: Sequence[RunRecord], metrics: Sequence[str]) -> None:
    with atomic_write(path) as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["run", "configuration", "seed", *metrics, "seconds"])
        for run in runs:
            writer.writerow([run.run_id, run.label, run.seed, *[f"{run.metrics.get(m, math.nan):.6f}" for m in metrics],
                             "" if run.seconds is None else run.seconds])


def markdown(summaries: Sequence[ConfigSummary], metrics: Sequence[str], baseline: ConfigSummary | None,
             primary: str, title: str, fixed: dict[str, Any], runs: Sequence[RunRecord], permutations: int,
             plots: Sequence[Path]) -> str:
    lines = [f"# {title}", ""]
    seconds = [run.seconds for run in runs if run.seconds is not None]
    if fixed:
        lines.append("Fixed in every run: " + ", ".join(f"`{k.split('.')[-1]}={v}`" for k, v in fixed.items()) + ".")
    if seconds:
        lines.append(f"{len(runs)} runs, wall time per run {np.mean(seconds) / 60:.1f} min on average.")
    lines.append("")
    header = ["configuration", "seeds", *[f"{m} (mean ± std)" for m in metrics]]
    if baseline is not None:
        header += [f"Δ {primary}", "p (t-test)", "p (perm.)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    best = {m: max(s.mean[m] for s in summaries) for m in metrics}
    for s in summaries:
        cells = [s.label + (" (baseline)" if s is baseline else "") + (" (reference)" if s.reference else ""),
                 "—" if s.reference else str(len(s.runs))]
        for m in metrics:
            cell = f"{s.mean[m]:.4f} ± {_fmt(s.std[m])}"
            cells.append(f"**{cell}**" if s.mean[m] == best[m] and len(summaries) > 1 else cell)
        if baseline is not None:
            test = s.tests.get(primary)
            if s is baseline or not test:
                cells += ["—", "—", "—"]
            else:
                mark = lambda p: "†" if not math.isnan(p) and p < 0.05 else ""  # noqa: E731
                cells += [f"{test['delta']:+.4f}", _fmt_p(test["p_ttest"]) + mark(test["p_ttest"]),
                          _fmt_p(test["p_perm"]) + mark(test["p_perm"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    notes = ["mean ± sample standard deviation (ddof=1) over seeds; the best mean per metric in bold."]
    if baseline is not None:
        queries = next((s.tests[primary]["queries"] for s in summaries if primary in s.tests), 0)
        exact = queries <= 20 and 2 ** queries <= permutations
        notes.append(f"p-values: {primary} per query averaged over each configuration's seeds, then paired over the "
                     f"{queries} queries against **{baseline.label}**: two-sided paired t-test (scipy.stats.ttest_rel) "
                     f"and paired randomization test ({'exact' if exact else f'{permutations:,} random sign flips'}); "
                     f"† p < 0.05 (uncorrected; Holm-adjusted values in {layout.REPORT_CSV}).")
    lines += [f"- {note}" for note in notes]
    if plots:
        lines += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"
