"""Configurations from runs: mean ± std over seeds, seed-averaged per-query values, tests against a baseline."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from research.errors import ResearchError
from research.eval.significance import holm, paired_randomization_test, paired_ttest
from research.runs.report.runs import RunRecord
from research.runs.sweep.naming import short_value


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
            summary.tests[metric] = _paired(summary, baseline, metric, permutations)
        for key in ("p_ttest", "p_perm"):
            adjusted = holm([s.tests[metric][key] for s in others])
            for summary, value in zip(others, adjusted):
                summary.tests[metric][f"{key}_holm"] = value


def _paired(a: ConfigSummary, b: ConfigSummary, metric: str, permutations: int) -> dict[str, float]:
    """Paired t-test and randomization test of ``a`` against ``b`` over their common queries."""
    queries = sorted(set(a.per_query[metric]) & set(b.per_query[metric]))
    x = [a.per_query[metric][q] for q in queries]
    y = [b.per_query[metric][q] for q in queries]
    t, p_t = paired_ttest(x, y)
    return {"delta": a.mean[metric] - b.mean[metric],
            "delta_per_query": float(np.mean(x) - np.mean(y)) if queries else math.nan,
            "t": t, "p_ttest": p_t, "p_perm": paired_randomization_test(x, y, permutations=permutations),
            "queries": len(queries)}


@dataclass
class FactorComparison:
    """Two configurations that differ in one parameter only: ``changed`` from ``first``'s value to ``second``'s."""

    parameter: str
    first: ConfigSummary
    second: ConfigSummary
    fixed: dict[str, Any]  # the other parameters, the same in both
    tests: dict[str, dict[str, float]] = field(default_factory=dict)  # metric -> delta (second - first), p-values


def one_factor_comparisons(summaries: Sequence[ConfigSummary], metrics: Sequence[str],
                           permutations: int = 10000) -> list[FactorComparison]:
    """Every pair of configurations whose parameters differ in exactly one key (a factorial sweep's main effects at
    each level of the others), tested paired over queries; Holm-adjusted over the comparisons, per metric."""
    configs = [s for s in summaries if not s.reference]
    keys = list(dict.fromkeys(k for s in configs for k in s.params))
    value = lambda s, k: json.dumps(s.params.get(k), sort_keys=True, default=str)  # noqa: E731
    comparisons = []
    for i, first in enumerate(configs):
        for second in configs[i + 1:]:
            changed = [k for k in keys if value(first, k) != value(second, k)]
            if len(changed) == 1:
                fixed = {k: short_value(first.params.get(k)) for k in keys if k != changed[0]}
                comparisons.append(FactorComparison(changed[0], first, second, fixed))
    for metric in metrics:
        for comparison in comparisons:
            comparison.tests[metric] = _paired(comparison.second, comparison.first, metric, permutations)
        for key in ("p_ttest", "p_perm"):
            adjusted = holm([c.tests[metric][key] for c in comparisons])
            for comparison, p in zip(comparisons, adjusted):
                comparison.tests[metric][f"{key}_holm"] = p
    return comparisons
