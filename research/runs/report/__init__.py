"""Reports over finished runs: mean ± std over seeds per configuration, paired significance tests, plots.

    research report runs/sweeps/scifact-losses --baseline InfoNCE --out experiments/results/scifact-losses

A run is a folder with ``eval_after/metrics.json`` and ``eval_after/per_query.json`` (``research fit``); a sweep run
also holds ``sweep_run.json`` (its swept parameter values and seed) and ``FINISHED``. Runs with equal swept values
form a *configuration*; other run folders are grouped by their parent folder's name (``runs/<name>/<time>``).

Significance against the baseline configuration, per metric: each configuration's per-query value is first averaged
over its seeds, then the two are compared query by query (paired, over the queries both have) with the paired
t-test and the paired randomization test of :mod:`research.eval.significance`, Holm-adjusted over the configurations.

Outputs: ``report.csv`` (one row per configuration), ``runs.csv`` (one row per run), ``report.md`` and a PNG per swept
parameter (``metrics_by_<parameter>.png``, one panel per metric, ``<metric>_by_<parameter>.png`` for a single metric:
mean ± std over seeds, each seed a dot).

Modules: :mod:`.runs` finds and reads the runs, :mod:`.summary` groups and tests them, :mod:`.tables` writes the CSV
and markdown, :mod:`.plot` the figures, and :mod:`.build` is :func:`make_report`, which does it all.
"""

from research.runs.report.build import make_report
from research.runs.report.plot import plot, plot_name
from research.runs.report.runs import RunRecord, find_runs, load_reference, resolve_source
from research.runs.report.summary import ConfigSummary, add_tests, find_baseline, summarize
from research.runs.report.tables import BUDGET_KEYS, fixed_settings, markdown, write_csv, write_runs_csv

__all__ = ["BUDGET_KEYS", "ConfigSummary", "RunRecord", "add_tests", "find_baseline", "find_runs", "fixed_settings",
           "load_reference", "make_report", "markdown", "plot", "plot_name", "resolve_source", "summarize", "write_csv",
           "write_runs_csv"]
