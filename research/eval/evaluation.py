"""A run with its metrics: evaluating it against qrels, and writing both to an evaluation folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from research.data.trec import Qrels, Run, write_run
from research.eval.metrics import DEFAULT_METRICS, MetricsResult, compute_metrics
from research.io import write_json

# The files of one saved evaluation: research.runs.layout and every reader of an evaluation folder use these names.
RUN_FILE = "run.trec"
METRICS_FILE = "metrics.json"
PER_QUERY_FILE = "per_query.json"


@dataclass
class Evaluation:
    run: Run
    metrics: MetricsResult


def evaluate_run(run: Run, qrels: Qrels, metrics=DEFAULT_METRICS, relevance_level: int = 1,
                 queries_without_relevant: str = "exclude") -> Evaluation:
    return Evaluation(run, compute_metrics(run, qrels, metrics=tuple(metrics), relevance_level=relevance_level,
                                           queries_without_relevant=queries_without_relevant))


def save_evaluation(out_dir: str | Path, evaluation: Evaluation, tag: str = "research", **info) -> None:
    """``run.trec``, ``metrics.json`` (aggregate + info) and ``per_query.json``, each written atomically."""
    out_dir = Path(out_dir)
    write_run(out_dir / RUN_FILE, evaluation.run, tag=tag)
    result = evaluation.metrics
    write_json(out_dir / PER_QUERY_FILE, result.per_query)
    write_json(out_dir / METRICS_FILE, {
        **result.aggregate, "num_queries": result.num_queries,
        "skipped_queries_without_relevant": len(result.skipped_queries), **info,
    })
