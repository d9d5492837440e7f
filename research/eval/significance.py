"""Paired significance tests of two systems' per-query values, and Holm's adjustment for many comparisons.

* :func:`paired_ttest`: the two-sided paired t-test, :func:`scipy.stats.ttest_rel`.
* :func:`paired_randomization_test`: the sign of each query's difference is flipped at random, the statistic is the
  mean difference, two-sided; exact over all ``2^n`` sign patterns when ``2^n <= permutations``, else
  ``permutations`` random patterns with ``p = (1 + #{|mean*| >= |mean|}) / (1 + permutations)``.
* :func:`holm`: Holm-Bonferroni adjusted p-values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["paired_ttest", "paired_randomization_test", "holm"]


def paired_ttest(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """``(t, p)`` of the two-sided paired t-test of ``a`` against ``b`` (:func:`scipy.stats.ttest_rel`).

    Equal samples (every difference 0) give ``(0.0, 1.0)``, a constant non-zero difference ``(±inf, 0.0)``; fewer than
    two pairs give NaNs.
    """
    from scipy import stats  # scipy takes a while to import: only a report with a baseline needs it

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
