"""Reports over finished runs: mean ± std over seeds per configuration, paired significance tests, plots.

    research report runs/sweeps/scifact-losses --baseline InfoNCE --out experiments/results/scifact-losses

A run is a folder with ``eval_after/metrics.json`` and ``eval_after/per_query.json`` (``research fit``); a sweep run
also holds ``sweep_run.json`` (its swept parameter values and seed) and ``FINISHED``. Runs with equal swept values
form a *configuration*; other run folders are grouped by their parent folder's name (``runs/<name>/<time>``).

Significance against the baseline configuration, per metric: each configuration's per-query value is first averaged
over its seeds, then the two are compared query by query (paired, over the queries both have) with

* the paired t-test, :func:`scipy.stats.ttest_rel` (two-sided), and
* the paired randomization (permutation) test: the sign of each query's difference is flipped at random, the
  statistic is the mean difference, two-sided; exact over all ``2^n`` sign patterns when ``2^n <= permutations``,
  else ``permutations`` random patterns with ``p = (1 + #{|mean*| >= |mean|}) / (1 + permutations)``.

Outputs: ``report.csv`` (one row per configuration), ``runs.csv`` (one row per run), ``report.md`` and a PNG per swept
parameter (``<metric>_by_<parameter>.png``: mean ± std over seeds, each seed a dot).
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from research.errors import ResearchError
from research.io import atomic_write
from research.eval.metrics import parse_metric

__all__ = ["RunRecord", "ConfigSummary", "find_runs", "summarize", "paired_ttest", "paired_randomization_test",
           "make_report"]

BUDGET_KEYS = (
    "model.init_args.model", "data.init_args.data", "trainer.max_steps", "trainer.max_epochs", "trainer.precision",
    "data.init_args.batch_size", "model.init_args.query_max_length", "model.init_args.document_max_length",
    "model.init_args.lr", "model.init_args.temperature", "model.init_args.warmup_ratio", "data.init_args.num_negatives",
    "trainer.accumulate_grad_batches", "evaluate_before_fit",
)


# ---------------------------------------------------------------- statistics
def paired_ttest(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """``(t, p)`` of the two-sided paired t-test of ``a`` against ``b`` (:func:`scipy.stats.ttest_rel`).

    Equal samples (every difference 0) give ``(0.0, 1.0)``, a constant non-zero difference ``(±inf, 0.0)``; fewer than
    two pairs give NaNs.
    """
    from scipy import stats

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError("paired samples differ in length")
    if len(a) < 2:
        return math.nan, math.nan
    diff = a - b
    if np.all(diff == 0):
        return 0.0, 1.0
    if np.ptp(diff) <= 1e-12 * max(1.0, float(np.abs(diff).max())):  # a constant difference: no variance
        return math.copysign(math.inf, float(diff.mean())), 0.0
    result = stats.ttest_rel(a, b)
    return float(result.statistic), float(result.pvalue)


def paired_randomization_test(a: Sequence[float], b: Sequence[float], permutations: int = 10000,
                              seed: int = 0) -> float:
    """Two-sided p-value of the paired randomization test on the mean difference (see the module docstring)."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = len(diff)
    if n == 0:
        return math.nan
    observed = abs(diff.mean())
    tolerance = 1e-12 * max(1.0, observed)
    if n <= 20 and 2 ** n <= permutations:  # exact: every sign pattern once
        signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)
        means = np.abs(signs @ diff) / n
        return float(np.mean(means >= observed - tolerance))
    rng = np.random.default_rng(seed)
    count = 0
    for start in range(0, permutations, 2000):
        size = min(2000, permutations - start)
        signs = rng.integers(0, 2, size=(size, n)) * 2 - 1
        count += int(np.sum(np.abs(signs @ diff) / n >= observed - tolerance))
    return (1 + count) / (1 + permutations)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (NaNs kept, left out of the count)."""
    indexed = [(p, i) for i, p in enumerate(pvalues) if not math.isnan(p)]
    m = len(indexed)
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(indexed)):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


# ---------------------------------------------------------------- runs
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


def resolve_source(source: str | Path, root: str | Path = "runs") -> Path:
    """A folder of runs: the path itself, or ``<root>/sweeps/<name>``, or ``<root>/<name>``."""
    path = Path(source)
    if path.is_dir():
        return path
    for candidate in (Path(root) / "sweeps" / str(source), Path(root) / str(source)):
        if candidate.is_dir():
            return candidate
    raise ResearchError(f"no runs found for {source!r}: not a folder, nor {Path(root) / 'sweeps' / str(source)} "
                        f"or {Path(root) / str(source)}")


def _load_run(run_dir: Path) -> RunRecord | None:
    metrics_path = run_dir / "eval_after" / "metrics.json"
    per_query_path = run_dir / "eval_after" / "per_query.json"
    if not metrics_path.is_file() or not per_query_path.is_file():
        return None
    info_path = run_dir / "sweep_run.json"
    config_path = run_dir / "config.yaml"
    config = _flatten(yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}) if config_path.is_file() else {}
    seconds = None
    if info_path.is_file():
        if not (run_dir / "FINISHED").is_file():
            return None  # a sweep run that did not finish (its eval may be from an earlier attempt)
        from research.runs.sweep import config_label

        info = json.loads(info_path.read_text(encoding="utf-8"))
        params = info.get("swept") or info.get("params") or {}
        label, seed, run_id = info.get("label") or config_label(params), info.get("seed"), info.get("run_id", run_dir.name)
        seconds = json.loads((run_dir / "FINISHED").read_text(encoding="utf-8")).get("seconds")
    else:
        params, label, run_id = {}, run_dir.parent.name, run_dir.name
        seed = config.get("seed_everything")
    metrics = {k: float(v) for k, v in json.loads(metrics_path.read_text(encoding="utf-8")).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and _is_metric(k)}
    per_query = json.loads(per_query_path.read_text(encoding="utf-8"))
    return RunRecord(run_dir, run_id, label, params, seed, metrics, per_query, config, seconds)


def _is_metric(name: str) -> bool:
    try:
        parse_metric(name)
    except ValueError:
        return False
    return True


def load_reference(spec: str) -> RunRecord:
    """``NAME=DIR``: one evaluation (``metrics.json`` + ``per_query.json`` in DIR, DIR/eval_after or DIR/eval)."""
    name, sep, folder = spec.partition("=")
    if not sep or not name or not folder:
        raise ResearchError(f"--reference {spec!r}: expected NAME=DIR")
    for candidate in (Path(folder), Path(folder) / "eval_after", Path(folder) / "eval"):
        if (candidate / "metrics.json").is_file() and (candidate / "per_query.json").is_file():
            metrics = {k: float(v) for k, v in json.loads((candidate / "metrics.json").read_text(encoding="utf-8")).items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and _is_metric(k)}
            per_query = json.loads((candidate / "per_query.json").read_text(encoding="utf-8"))
            return RunRecord(candidate, name, name, {}, None, metrics, per_query)
    raise ResearchError(f"--reference {spec!r}: no metrics.json + per_query.json in {folder} (or its eval_after/, eval/)")


def find_runs(source: str | Path, root: str | Path = "runs") -> list[RunRecord]:
    """Finished runs under ``source`` (its own run folders and, one level down, ``<name>/<time>`` folders)."""
    base = resolve_source(source, root)
    candidates = [base] + sorted(p for p in base.iterdir() if p.is_dir())
    candidates += sorted(q for p in base.iterdir() if p.is_dir() for q in p.iterdir() if q.is_dir())
    runs = [run for run in map(_load_run, candidates) if run is not None]
    if not runs:
        raise ResearchError(f"no finished runs (eval_after/metrics.json + per_query.json) under {base}")
    return runs


# ---------------------------------------------------------------- summary
@dataclass
class ConfigSummary:
    label: str
    params: dict[str, Any]
    runs: list[RunRecord]
    mean: dict[str, float]
    std: dict[str, float]
    per_query: dict[str, dict[str, float]]  # metric -> query -> value averaged over seeds
    tests: dict[str, dict[str, float]] = field(default_factory=dict)  # metric -> delta, p_ttest, p_perm, ...
    reference: bool = False  # a single evaluation given with --reference (e.g. the zero-shot model), not a sweep run

    @property
    def seeds(self) -> list[Any]:
        return [run.seed for run in self.runs]


def summarize(runs: Sequence[RunRecord], metrics: Sequence[str]) -> list[ConfigSummary]:
    """Group runs by configuration label (first-seen order) into mean, std (ddof=1) and seed-averaged per-query values."""
    groups: dict[str, list[RunRecord]] = {}
    for run in runs:
        groups.setdefault(run.label, []).append(run)
    summaries = []
    for label, group in groups.items():
        group.sort(key=lambda r: (r.seed is None, r.seed if isinstance(r.seed, int) else 0, r.run_id))
        mean, std, per_query = {}, {}, {}
        for metric in metrics:
            values = [run.metrics[metric] for run in group if metric in run.metrics]
            mean[metric] = float(np.mean(values)) if values else math.nan
            std[metric] = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
            queries = set.intersection(*(set(run.per_query) for run in group))
            per_query[metric] = {q: float(np.mean([run.per_query[q][metric] for run in group])) for q in sorted(queries)
                                 if all(metric in run.per_query[q] for run in group)}
        summaries.append(ConfigSummary(label, group[0].params, group, mean, std, per_query))
    return summaries


def find_baseline(summaries: Sequence[ConfigSummary], name: str) -> ConfigSummary:
    """The configuration named ``name``: its label (case-insensitive), a run id of it, or a unique label substring."""
    lowered = name.lower()
    for summary in summaries:
        if summary.label.lower() == lowered or any(run.run_id == name for run in summary.runs):
            return summary
    matches = [s for s in summaries if lowered in s.label.lower()]
    if len(matches) == 1:
        return matches[0]
    labels = ", ".join(s.label for s in summaries)
    raise ResearchError(f"baseline {name!r} matches {len(matches)} configurations (have: {labels})")


def add_tests(summaries: Sequence[ConfigSummary], baseline: ConfigSummary, metrics: Sequence[str],
              permutations: int = 10000) -> None:
    """Paired t-test and randomization test of every configuration against ``baseline``, per metric (+ Holm)."""
    for metric in metrics:
        others = [s for s in summaries if s is not baseline]
        for summary in others:
            queries = sorted(set(summary.per_query[metric]) & set(baseline.per_query[metric]))
            a = [summary.per_query[metric][q] for q in queries]
            b = [baseline.per_query[metric][q] for q in queries]
            t, p_t = paired_ttest(a, b)
            p_perm = paired_randomization_test(a, b, permutations=permutations)
            summary.tests[metric] = {"delta": summary.mean[metric] - baseline.mean[metric],
                                     "delta_per_query": float(np.mean(a) - np.mean(b)) if queries else math.nan,
                                     "t": t, "p_ttest": p_t, "p_perm": p_perm, "queries": len(queries)}
        for key in ("p_ttest", "p_perm"):
            adjusted = holm([s.tests[metric][key] for s in others])
            for summary, value in zip(others, adjusted):
                summary.tests[metric][f"{key}_holm"] = value


# ---------------------------------------------------------------- writing
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
                     "† p < 0.05 (uncorrected; Holm-adjusted values in report.csv).")
    lines += [f"- {note}" for note in notes]
    if plots:
        lines += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def plot(summaries: Sequence[ConfigSummary], metrics: Sequence[str], param: str | None, out: Path,
         baseline: ConfigSummary | None, title: str) -> Path:
    """Mean ± std over seeds of each metric by ``param`` (one panel per metric), every seed as a dot.

    The other swept parameters make series: lines over a numeric ``param``, side-by-side points over a categorical one.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from research.runs.sweep import short_key, short_value

    references = [s for s in summaries if s.reference]
    summaries = [s for s in summaries if not s.reference]
    values = [s.params.get(param) for s in summaries] if param else [s.label for s in summaries]
    numeric = param is not None and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    series: dict[str, list[ConfigSummary]] = {}
    for s in summaries:
        rest = {k: v for k, v in s.params.items() if k != param} if param else {}
        series.setdefault(" ".join(f"{short_key(k)}={short_value(v)}" for k, v in rest.items()), []).append(s)
    categories = list(dict.fromkeys(short_value(v) if param else v for v in values))
    width = max(4.2, (0.9 * len(categories) * max(1, len(series)) ** 0.5 + 1.8)) if not numeric else 6.0
    fig, axes = plt.subplots(1, len(metrics), figsize=(width * len(metrics), 4.2), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes[0], metrics):
        std = {id(s): 0.0 if math.isnan(s.std[metric]) else s.std[metric] for s in summaries}
        if baseline is not None:
            ax.axhline(baseline.mean[metric], color="tab:gray", linestyle="--", linewidth=1, zorder=1,
                       label=f"{baseline.label} (baseline)")
        for k, ref in enumerate(references):
            if ref is not baseline:
                ax.axhline(ref.mean[metric], color=colors[(k + 3) % len(colors)], linestyle=":", linewidth=1.5,
                           zorder=1, label=f"{ref.label} (reference)")
        for j, (name, group) in enumerate(series.items()):
            color = colors[j % len(colors)]
            many = len(series) > 1
            if numeric:
                group = sorted(group, key=lambda s: s.params[param])
                xs = [float(s.params[param]) for s in group]
                ax.errorbar(xs, [s.mean[metric] for s in group], yerr=[std[id(s)] for s in group], marker="o",
                            capsize=4, color=color, label=name or "mean ± std over seeds")
                for s in group:
                    ax.scatter([s.params[param]] * len(s.runs), [r.metrics[metric] for r in s.runs], s=12,
                               color="gray", alpha=0.6, zorder=3)
                continue
            offset = (j - (len(series) - 1) / 2) * (0.7 / len(series)) if many else 0.0
            for s in group:
                i = categories.index(short_value(s.params.get(param)) if param else s.label) + offset
                ys = [r.metrics[metric] for r in s.runs]
                jitter = np.linspace(-0.05, 0.05, len(ys)) if len(ys) > 1 else np.zeros(1)
                ax.scatter(i + (0.12 if not many else 0.0) + jitter, ys, s=12, color="gray", alpha=0.7, zorder=2,
                           label="one seed" if (j == 0 and s is group[0]) else None)
                point_color = "tab:gray" if (s is baseline and not many) else (color if many else "tab:blue")
                ax.errorbar([i], [s.mean[metric]], yerr=[std[id(s)]], fmt="o", markersize=7, capsize=5, elinewidth=1.5,
                            color=point_color, zorder=3,
                            label=(name if many else "mean ± std over seeds") if s is group[0] else None)
                ax.annotate(f"{s.mean[metric]:.3f}", (i, s.mean[metric] + std[id(s)]), textcoords="offset points",
                            xytext=(0, 5), ha="center", fontsize=7 if many else 8)
        if numeric:
            xs_all = [float(v) for v in values]
            if min(xs_all) > 0 and max(xs_all) / min(xs_all) > 20:
                ax.set_xscale("log")
        else:
            ax.set_xticks(np.arange(len(categories)), categories,
                          rotation=20 if max(map(len, map(str, categories))) > 10 else 0)
            ax.set_xlim(-0.6, len(categories) - 0.4)
        lows = [min(min(r.metrics[metric] for r in s.runs), s.mean[metric] - std[id(s)]) for s in summaries]
        highs = [max(max(r.metrics[metric] for r in s.runs), s.mean[metric] + std[id(s)]) for s in summaries]
        lows += [ref.mean[metric] for ref in references]
        highs += [ref.mean[metric] for ref in references]
        pad = max(0.005, 0.12 * (max(highs) - min(lows)))
        ax.set_ylim(min(lows) - pad, max(highs) + 2 * pad)
        ax.set_ylabel(metric)
        ax.set_xlabel(short_key(param) if param else "configuration")
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(f"{metric} by {short_key(param) if param else 'configuration'}")
    handles, labels = axes[0][0].get_legend_handles_labels()  # one legend under the panels, clear of the data
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    rows = math.ceil(len(labels) / 6)
    fig.tight_layout(rect=(0, 0.04 + 0.05 * rows, 1, 1))
    name = re.sub(r"[^A-Za-z0-9]+", "_", f"{metrics[0]}_by_{short_key(param) if param else 'configuration'}").strip("_")
    path = out / f"{name}.png"
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as handle:  # a complete PNG or the previous one
        fig.savefig(handle, format="png", dpi=120)
    plt.close(fig)
    return path


def make_report(source: str | Path, baseline: str | None = None, metrics: Sequence[str] | None = None,
                out: str | Path | None = None, permutations: int = 10000, root: str | Path = "runs",
                title: str | None = None, quiet: bool = False, references: Sequence[str] = ()) -> dict[str, Any]:
    """Gather the finished runs of ``source`` and write ``report.csv``, ``runs.csv``, ``report.md`` and plots.

    ``references`` (``NAME=DIR``) add single evaluations, e.g. the untrained model, as rows and dashed lines.
    """
    base = resolve_source(source, root)
    runs = find_runs(base, root)
    sweep_metric, order = None, {}
    state = base / "sweep_state.json"
    if state.is_file():  # a sweep folder: its metric, and its configurations in the sweep file's order
        from research.runs.sweep import configurations, load_sweep

        sweep_file = json.loads(state.read_text(encoding="utf-8")).get("file")
        if sweep_file and Path(sweep_file).is_file():
            try:
                sweep = load_sweep(sweep_file)
                sweep_metric = (sweep.metric_name or "").split("/")[-1] or None
                keys = [json.dumps(c, sort_keys=True, default=str) for c in configurations(sweep)]
                order = {key: i for i, key in enumerate(keys)}
            except ResearchError:
                pass
    if metrics:
        metrics = [f"{parse_metric(m)[0]}@{parse_metric(m)[1]}" for m in metrics]
    else:
        metrics = list(runs[0].metrics)
    reference_runs = [load_reference(spec) for spec in references]
    missing = [m for m in metrics if any(m not in run.metrics for run in [*runs, *reference_runs])]
    if missing:
        raise ResearchError(f"metric(s) {', '.join(missing)} missing from some runs' metrics.json")
    primary = sweep_metric if sweep_metric in metrics else metrics[0]
    summaries = summarize(runs, metrics)
    if order:
        def position(summary: ConfigSummary) -> int:
            info = summary.runs[0].run_dir / "sweep_run.json"
            params = json.loads(info.read_text(encoding="utf-8")).get("params") if info.is_file() else None
            return order.get(json.dumps(params, sort_keys=True, default=str), len(order))

        summaries.sort(key=position)
    for summary in summarize(reference_runs, metrics):
        summary.reference = True
        summaries.append(summary)
    base_summary = find_baseline(summaries, baseline) if baseline else None
    if base_summary is not None:
        add_tests(summaries, base_summary, metrics, permutations)
    param_keys = list(dict.fromkeys(k for s in summaries for k in s.params))
    varying = [k for k in param_keys if len({json.dumps(s.params.get(k), sort_keys=True, default=str) for s in summaries}) > 1]
    out = Path(out) if out else base / "report"
    out.mkdir(parents=True, exist_ok=True)
    title = title or f"{base.name}: {len(summaries)} configurations, {len(runs)} runs"
    plots = [plot(summaries, metrics, param, out, base_summary, title) for param in (varying or [None])]
    fixed, _ = fixed_settings(runs)
    write_csv(out / "report.csv", summaries, metrics, param_keys)
    write_runs_csv(out / "runs.csv", [*runs, *reference_runs], metrics)
    text = markdown(summaries, metrics, base_summary, primary, title, fixed, runs, permutations, plots)
    with atomic_write(out / "report.md") as handle:
        handle.write(text)
    if not quiet:
        print(text)
        print(f"wrote {out / 'report.md'}, {out / 'report.csv'}, {out / 'runs.csv'}, " + ", ".join(map(str, plots)))
    return {"summaries": summaries, "baseline": base_summary, "out": out, "plots": plots, "metrics": metrics,
            "primary": primary}
