"""``research report``: gather a folder's finished runs, summarize and test them, write the tables and figures."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from research.errors import ResearchError
from research.eval.metrics import parse_metric
from research.io import atomic_write
from research.runs import layout
from research.runs.report.plot import plot
from research.runs.report.runs import find_runs, load_reference, resolve_source
from research.runs.report.summary import ConfigSummary, add_tests, find_baseline, one_factor_comparisons, summarize
from research.runs.report.tables import (
    fixed_settings,
    markdown,
    one_factor_markdown,
    write_csv,
    write_one_factor_csv,
    write_runs_csv,
)
from research.runs.sweep.spec import configurations, load_sweep


def _sweep_order(base: Path) -> tuple[str | None, dict[str, int]]:
    """A sweep folder's metric (W&B's ``test/nDCG@10`` -> ``nDCG@10``) and its configurations in the file's order."""
    state = base / layout.SWEEP_STATE_FILE
    if not state.is_file():
        return None, {}
    recorded = json.loads(state.read_text(encoding="utf-8"))
    sweep_file = recorded.get("file")
    if not sweep_file or not Path(sweep_file).is_file():
        return None, {}
    try:
        sweep = load_sweep(sweep_file, recorded.get("constants"))
    except ResearchError:  # the sweep file changed since: the runs still report, in the order found
        return None, {}
    metric = (sweep.metric_name or "").split("/")[-1] or None
    try:
        keys = [json.dumps(c, sort_keys=True, default=str) for c in configurations(sweep)]
    except ResearchError:  # no offline configurations (bayes): no order to follow
        return metric, {}
    return metric, {key: i for i, key in enumerate(keys)}


def make_report(source: str | Path, baseline: str | None = None, metrics: Sequence[str] | None = None,
                out: str | Path | None = None, permutations: int = 10000, root: str | Path = layout.RUNS_ROOT,
                title: str | None = None, quiet: bool = False, references: Sequence[str] = (),
                one_factor: bool = False) -> dict[str, Any]:
    """Gather the finished runs of ``source`` and write ``report.csv``, ``runs.csv``, ``report.md`` and plots.

    ``references`` (``NAME=DIR``) add single evaluations, e.g. the untrained model, as rows and dashed lines.
    ``one_factor``: also test every pair of configurations that differ in one parameter (``one_factor.csv`` and a
    section of ``report.md``), the main effects of a factorial sweep at each level of the other parameters.
    """
    base = resolve_source(source, root)
    runs = find_runs(base, root)
    sweep_metric, order = _sweep_order(base)
    if metrics:
        metrics = [f"{parse_metric(m)[0]}@{parse_metric(m)[1]}" for m in metrics]
    else:
        metrics = list(runs[0].metrics)
    reference_runs = [load_reference(spec) for spec in references]
    missing = [m for m in metrics if any(m not in run.metrics for run in [*runs, *reference_runs])]
    if missing:
        raise ResearchError(f"metric(s) {', '.join(missing)} missing from some runs' {layout.METRICS_FILE}")
    primary = sweep_metric if sweep_metric in metrics else metrics[0]
    summaries = summarize(runs, metrics)
    if order:
        def position(summary: ConfigSummary) -> int:
            info = summary.runs[0].run_dir / layout.SWEEP_RUN_FILE
            params = json.loads(info.read_text(encoding="utf-8")).get("params") if info.is_file() else None
            return order.get(json.dumps(params, sort_keys=True, default=str), len(order))

        summaries.sort(key=position)
    for summary in summarize(reference_runs, metrics):
        summary.reference = True
        summaries.append(summary)
    base_summary = find_baseline(summaries, baseline) if baseline else None
    if base_summary is not None:
        add_tests(summaries, base_summary, metrics, permutations)
    comparisons = one_factor_comparisons(summaries, metrics, permutations) if one_factor else []
    if one_factor and not comparisons:
        raise ResearchError(f"--one-factor: no two configurations of {base} differ in exactly one parameter")
    param_keys = list(dict.fromkeys(k for s in summaries for k in s.params))
    varying = [k for k in param_keys if len({json.dumps(s.params.get(k), sort_keys=True, default=str) for s in summaries}) > 1]
    out = Path(out) if out else base / layout.REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    title = title or f"{base.name}: {len(summaries)} configurations, {len(runs)} runs"
    plots = [plot(summaries, metrics, param, out, base_summary, title) for param in (varying or [None])]
    fixed, _ = fixed_settings(runs)
    write_csv(out / layout.REPORT_CSV, summaries, metrics, param_keys)
    write_runs_csv(out / layout.RUNS_CSV, [*runs, *reference_runs], metrics)
    text = markdown(summaries, metrics, base_summary, primary, title, fixed, runs, permutations, plots)
    if one_factor:
        write_one_factor_csv(out / layout.ONE_FACTOR_CSV, comparisons, metrics)
        text += "\n".join(one_factor_markdown(comparisons, primary, permutations)) + "\n"
    with atomic_write(out / layout.REPORT_MD) as handle:
        handle.write(text)
    if not quiet:
        print(text)
        print(f"wrote {out}/: " + ", ".join([layout.REPORT_MD, layout.REPORT_CSV, layout.RUNS_CSV,
                                               *([layout.ONE_FACTOR_CSV] if one_factor else []),
                                               *(p.name for p in plots)]))
    return {"summaries": summaries, "baseline": base_summary, "out": out, "plots": plots, "metrics": metrics,
            "primary": primary, "one_factor": comparisons}
