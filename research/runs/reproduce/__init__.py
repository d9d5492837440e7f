"""Reproduce baseline tables from nothing: run each row's commands, after the rows it consumes; re-score its run
file; compare with the expected values.

    research reproduce experiments/baselines/scifact.yaml [--only NAME ...] [--all] [--reuse] [--strict] [--dry-run]

A baselines file::

    data: scifact                  # defaults for every row (a row may override any of them)
    split: test
    relevance_level: 1             # grade >= level counts as relevant for R@k, AP@k, RR@k, P@k (nDCG: graded gains)
    queries_without_relevant: exclude   # or trec_eval: average over every qrels query (research.eval.metrics)
    tolerance: 0.002               # |measured - expected| allowed
    rows:
      - name: bm25
        kind: bm25                 # bm25 | dense | fit | rerank | command | score  (one class each, ROW_KINDS)
        metrics:
          nDCG@10: {expected: 0.6863, published: 0.687, tolerance: 0.001}
      - name: cross-encoder-stage1
        kind: fit                  # no metrics: it produces a model (out/model) for other rows
        configs: [experiments/scifact/cross_encoder.yaml]
      - name: bm25-cross-encoder
        kind: rerank
        model: {row: cross-encoder-stage1}           # that row's main output (a fit row's: its model)
        interpolate: 0.5           # it scores out/interpolated/run.trec, and leaves the re-ranker's own run.trec
        metrics: {nDCG@10: {expected: 0.7272}}
      - name: bm25-cross-encoder-raw
        kind: score                # runs nothing: scores a run file another row writes
        run: {row: bm25-cross-encoder, output: raw}
        metrics: {nDCG@10: {expected: 0.6585}}
      - name: qrels-groups
        kind: command              # any command lines; ${out} is the row's folder
        command: research zelo qrels-groups --data scifact --top-n 20 --out ${out}/groups.jsonl
        output: ${out}/groups.jsonl
      - name: student
        kind: fit
        enabled: false             # run only when named with --only, consumed by a selected row, or with --all
        configs: [experiments/zelo/student_qrels.yaml]
        args: [--data.init_args.groups_file, "${rows.qrels-groups}", --model.init_args.model,
               "${rows.cross-encoder-stage1.model}"]
        metrics: {nDCG@10: {expected: null}}        # no expectation: reported "measured" (--strict fails on it)

A row consumes another row's output through ``{row: NAME[, output: OUT][, path: SUB]}`` or ``${rows.NAME[.OUT]}``
in any of its fields (outputs: ``out`` the row folder, ``run`` its run file, ``model`` a fit row's model, ``output``
a command row's, ``raw`` an interpolating re-rank's own run); the rows run in dependency order, so ``--only X`` runs what X consumes first. An unknown row, an
unknown output or a cycle is one error line naming the file and the line.

Each row writes into ``<out>/<row name>/``, which is deleted first (with a command row's ``output`` elsewhere), so
no earlier output can be scored; ``--reuse`` keeps an existing output instead and the table says which file, of
when. The run file is re-scored with :func:`research.eval.metrics.compute_metrics` at the row's
``relevance_level`` and ``queries_without_relevant``, so every row is measured the same way. The table (``<out>/reproduce.md``, and ``--table``)
has a results JSON beside it; rows not run this time keep their last result from it, marked with its time. The
exit code is 1 when a row run now is outside a tolerance or did not finish (``--strict``: or has a metric without
an expectation).

Modules: :mod:`.rows` the row kinds, :mod:`.baselines` the file, references and run order, :mod:`.table` results,
JSON and markdown, :mod:`.runner` running rows. The names inside the folders are :mod:`research.runs.layout`'s.
"""

from research.runs.reproduce.baselines import (
    BaselineError,
    Baselines,
    load_baselines,
    read_baselines,
    resolve,
    run_order,
)
from research.runs.reproduce.rows import (
    ROW_KINDS,
    BM25Row,
    CommandRow,
    DenseEvalRow,
    FitEvalRow,
    MetricTarget,
    RerankRow,
    Row,
    ScoreRow,
)
from research.runs.reproduce.runner import reproduce, run_row, score_run
from research.runs.reproduce.table import RowResult, markdown_table, results_json

__all__ = [
    "ROW_KINDS", "BM25Row", "BaselineError", "Baselines", "CommandRow", "DenseEvalRow", "FitEvalRow", "MetricTarget",
    "RerankRow", "Row", "RowResult", "ScoreRow", "load_baselines", "markdown_table", "read_baselines", "reproduce", "resolve",
    "results_json", "run_order", "run_row", "score_run",
]
