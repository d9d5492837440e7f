"""A report's figures: each metric by a swept parameter, mean ± std over seeds with every seed as a dot."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from research.io import atomic_write
from research.runs.report.summary import ConfigSummary
from research.runs.sweep.naming import short_key, short_value


def plot_name(metrics: Sequence[str], param: str | None) -> str:
    """``metrics_by_loss.png`` (every metric's panel), or ``nDCG_10_by_loss.png`` when the report has one metric."""
    what = metrics[0] if len(metrics) == 1 else "metrics"
    return re.sub(r"[^A-Za-z0-9]+", "_", f"{what}_by_{short_key(param) if param else 'configuration'}").strip("_") + ".png"


def plot(summaries: Sequence[ConfigSummary], metrics: Sequence[str], param: str | None, out: Path,
         baseline: ConfigSummary | None, title: str) -> Path:
    """Mean ± std over seeds of each metric by ``param`` (one panel per metric), every seed as a dot.

    The other swept parameters make series: lines over a numeric ``param``, side-by-side points over a categorical one.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    path = out / plot_name(metrics, param)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as handle:  # a complete PNG or the previous one
        fig.savefig(handle, format="png", dpi=120)
    plt.close(fig)
    return path
