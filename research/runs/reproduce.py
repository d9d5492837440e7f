"""Reproduce baseline rows: run each row's command, re-score its run file, compare with the expected values.

    research reproduce experiments/baselines/scifact.yaml [--only NAME ...] [--all] [--reuse] [--dry-run]

A baselines file::

    data: scifact                  # defaults for every row (a row may override any of them)
    split: test
    relevance_level: 1             # grade >= level counts as relevant for R@k, AP@k, RR@k, P@k (nDCG: graded gains)
    tolerance: 0.002               # |measured - expected| allowed
    rows:
      - name: bm25
        kind: bm25                 # bm25 | dense | fit | rerank  (one small class each, ROW_KINDS)
        k1: 1.5
        b: 0.75
        metrics:
          nDCG@10: {expected: 0.6863, published: 0.687, tolerance: 0.001}
        source: MTEB bm25s baseline
      - name: llm-reranker
        kind: rerank
        enabled: false             # skipped unless named with --only or run with --all
        ...

Each row writes into ``<out>/<row name>/``; its run file (``run.trec``) is re-scored here with
:func:`research.eval.metrics.compute_metrics` at the row's ``relevance_level``, so every row is measured the same way
whatever command produced it. A metric without ``expected`` is reported as measured only (no pass/fail). The exit
code is 1 when a measured value is outside its tolerance or a row's command failed.
"""

from __future__ import annotations

import math
import shlex
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from research.data.beir import resolve_dataset
from research.data.trec import read_run, read_tsv_qrels
from research.errors import ResearchError
from research.eval.metrics import compute_metrics, parse_metric
from research.io import atomic_write, read_yaml_file, write_json, yaml_location
from research.runs import layout

DEFAULTS = ("data", "split", "relevance_level", "tolerance", "top_k", "precision")


class BaselineError(ResearchError):
    """A baselines file is invalid."""


@dataclass
class MetricTarget:
    name: str
    expected: float | None = None
    published: float | None = None
    tolerance: float = 0.002

    def check(self, measured: float | None) -> str:
        if measured is None or math.isnan(measured):
            return "error"
        if self.expected is None:
            return "measured"
        return "pass" if abs(measured - self.expected) <= self.tolerance + 1e-12 else "FAIL"


@dataclass
class Row:
    """One baseline: a command that leaves a run file, and the values it should score."""

    kind: ClassVar[str] = ""
    name: str
    data: str
    split: str = "test"
    metrics: list[MetricTarget] = field(default_factory=list)
    relevance_level: int = 1
    enabled: bool = True
    source: str | None = None
    notes: str | None = None
    top_k: int = 100
    precision: str = "32-true"

    #: row keys the subclass reads (besides the common ones)
    fields: ClassVar[tuple[str, ...]] = ()

    def command(self, out: Path) -> list[str]:
        """The ``research ...`` arguments that write this row's outputs under ``out``."""
        raise NotImplementedError

    def commands(self, out: Path) -> list[list[str]]:
        return [self.command(out)]

    def run_file(self, out: Path) -> Path:
        return out / layout.RUN_FILE

    def describe(self) -> str:
        return self.kind


@dataclass
class BM25Row(Row):
    kind: ClassVar[str] = "bm25"
    fields: ClassVar[tuple[str, ...]] = ("k1", "b")
    k1: float = 1.5
    b: float = 0.75

    def command(self, out: Path) -> list[str]:
        return ["bm25", "--data", self.data, "--split", self.split, "--out", str(out), "--top-k", str(self.top_k),
                "--k1", str(self.k1), "--b", str(self.b)]

    def describe(self) -> str:
        return f"BM25 (bm25s, k1={self.k1}, b={self.b})"


@dataclass
class DenseEvalRow(Row):
    kind: ClassVar[str] = "dense"
    fields: ClassVar[tuple[str, ...]] = ("model", "max_length", "batch_size")
    model: str = ""
    max_length: int | None = None
    batch_size: int = 16

    def command(self, out: Path) -> list[str]:
        command = ["evaluate", "--model", self.model, "--data", self.data, "--split", self.split, "--out", str(out),
                   "--top-k", str(self.top_k), "--precision", self.precision, "--batch-size", str(self.batch_size)]
        if self.max_length is not None:
            command += ["--max-length", str(self.max_length)]
        return command

    def describe(self) -> str:
        return f"dense {self.model.split('/')[-1]} zero-shot ({self.precision})"


@dataclass
class FitEvalRow(Row):
    """``research fit`` (configs + extra arguments) into ``out``; the run file is ``out/eval_after/run.trec``."""

    kind: ClassVar[str] = "fit"
    fields: ClassVar[tuple[str, ...]] = ("configs", "args")
    configs: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)

    def command(self, out: Path) -> list[str]:
        command = ["fit"]
        for config in self.configs:
            command += ["--config", config]
        return command + ["--run_dir", str(out), "--name", self.name, *self.args]

    def run_file(self, out: Path) -> Path:
        return out / layout.EVAL_AFTER / layout.RUN_FILE

    def describe(self) -> str:
        return "fit, then test: " + " + ".join(Path(c).stem for c in self.configs)


@dataclass
class RerankRow(Row):
    """``research rerank`` of a candidate run; with ``train`` configs, fit the re-ranker first (``out/train/model``).

    With ``interpolate: W`` the row scores ``out/interpolated/run.trec``: W x z(re-ranker) + (1 - W) x z(candidates).
    """

    kind: ClassVar[str] = "rerank"
    fields: ClassVar[tuple[str, ...]] = ("model", "train", "train_args", "candidates", "batch_size", "max_length",
                                         "interpolate")
    model: str | None = None
    train: list[str] = field(default_factory=list)
    train_args: list[str] = field(default_factory=list)
    candidates: str = "bm25"
    batch_size: int = 32
    max_length: int | None = None
    interpolate: float | None = None

    def model_path(self, out: Path) -> str:
        return self.model if self.model else str(out / layout.ROW_TRAIN_DIR / layout.MODEL_DIR)

    def command(self, out: Path) -> list[str]:
        command = ["rerank", "--model", self.model_path(out), "--data", self.data, "--split", self.split,
                   "--candidates", self.candidates, "--top-k", str(self.top_k), "--out", str(out),
                   "--precision", self.precision, "--batch-size", str(self.batch_size)]
        if self.max_length is not None:
            command += ["--max-length", str(self.max_length)]
        if self.interpolate is not None:
            command += ["--interpolate", str(self.interpolate)]
        return command

    def run_file(self, out: Path) -> Path:
        return (out / layout.INTERPOLATED_DIR if self.interpolate is not None else out) / layout.RUN_FILE

    def commands(self, out: Path) -> list[list[str]]:
        if not self.train:
            return [self.command(out)]
        fit = ["fit"]
        for config in self.train:
            fit += ["--config", config]
        fit += ["--run_dir", str(out / layout.ROW_TRAIN_DIR), "--name", f"{self.name}-train", *self.train_args]
        return [fit, self.command(out)]

    def describe(self) -> str:
        what = self.model or " + ".join(Path(c).stem for c in self.train)
        fused = f", interpolated {self.interpolate:g}/{1 - self.interpolate:g} with {self.candidates}" if self.interpolate is not None else ""
        return f"{self.candidates} top-{self.top_k} re-ranked by {what}{fused}"


ROW_KINDS: dict[str, type[Row]] = {cls.kind: cls for cls in (BM25Row, DenseEvalRow, FitEvalRow, RerankRow)}
COMMON = ("name", "kind", "data", "split", "metrics", "relevance_level", "enabled", "source", "notes", "top_k",
          "precision", "tolerance")


def parse_row(raw: dict[str, Any], defaults: dict[str, Any], where: str) -> Row:
    if not isinstance(raw, dict):
        raise BaselineError(f"{where}: a row must be a mapping")
    merged = {**{k: v for k, v in defaults.items() if k in DEFAULTS}, **raw}
    name = merged.get("name")
    if not name or not isinstance(name, str):
        raise BaselineError(f"{where}: row without a 'name'")
    kind = merged.get("kind")
    cls = ROW_KINDS.get(kind)
    if cls is None:
        raise BaselineError(f"{where}: row {name!r}: unknown kind {kind!r} (one of {', '.join(ROW_KINDS)})")
    unknown = sorted(set(merged) - set(COMMON) - set(cls.fields))
    if unknown:
        raise BaselineError(f"{where}: row {name!r} ({kind}): unknown key(s) {', '.join(unknown)}")
    if "data" not in merged:
        raise BaselineError(f"{where}: row {name!r}: no 'data' (set it on the row or at the top of the file)")
    tolerance = float(merged.get("tolerance", 0.002))
    metrics_raw = merged.get("metrics")
    if not isinstance(metrics_raw, dict) or not metrics_raw:
        raise BaselineError(f"{where}: row {name!r}: 'metrics' must map metric names to {{expected, published, tolerance}}")
    metrics = []
    for metric, spec in metrics_raw.items():
        try:
            family, k = parse_metric(metric)
        except ValueError as err:
            raise BaselineError(f"{where}: row {name!r}: {err}") from None
        spec = spec if isinstance(spec, dict) else {"expected": spec}
        bad = sorted(set(spec) - {"expected", "published", "tolerance"})
        if bad:
            raise BaselineError(f"{where}: row {name!r} metric {metric}: unknown key(s) {', '.join(bad)}")
        metrics.append(MetricTarget(f"{family}@{k}", _float(spec.get("expected")), _float(spec.get("published")),
                                    float(spec.get("tolerance", tolerance))))
    kwargs = {k: merged[k] for k in ("name", "data", "split", "relevance_level", "enabled", "source", "notes",
                                      "top_k", "precision") if k in merged}
    kwargs.update({k: merged[k] for k in cls.fields if k in merged})
    for key in ("configs", "args", "train", "train_args"):
        if isinstance(kwargs.get(key), str):
            kwargs[key] = [kwargs[key]]
    row = cls(metrics=metrics, **kwargs)
    if isinstance(row, DenseEvalRow) and not row.model:
        raise BaselineError(f"{where}: row {name!r} (dense): 'model' is required")
    if isinstance(row, FitEvalRow) and not row.configs:
        raise BaselineError(f"{where}: row {name!r} (fit): 'configs' is required")
    if isinstance(row, RerankRow) and not (row.model or row.train):
        raise BaselineError(f"{where}: row {name!r} (rerank): 'model' or 'train' configs are required")
    return row


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def load_baselines(path: str | Path) -> tuple[dict[str, Any], list[Row]]:
    path = Path(path)
    raw = read_yaml_file(path, "baselines file")  # missing, non-UTF-8, YAML syntax: one line naming file and line
    if not isinstance(raw, dict) or not isinstance(raw.get("rows"), list):
        raise BaselineError(f"{path}: expected a mapping with a 'rows' list")
    unknown = sorted(set(raw) - set(DEFAULTS) - {"rows", "title", "description"})
    if unknown:
        raise BaselineError(f"{yaml_location(path, unknown[0])} unknown top-level key(s) {', '.join(unknown)}")
    rows = [parse_row(r, raw, f"{path} row {i + 1}") for i, r in enumerate(raw["rows"])]
    names = [row.name for row in rows]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise BaselineError(f"{path}: duplicate row name(s) {', '.join(duplicates)}")
    return raw, rows


# ---------------------------------------------------------------- measuring
def load_qrels(data: str, split: str):
    path = resolve_dataset(data) / "qrels" / f"{split}.tsv"
    if not path.is_file():
        raise ResearchError(f"{path}: no qrels for split {split!r}")
    return read_tsv_qrels(path)


def score_run(row: Row, run_path: Path) -> dict[str, float]:
    """The row's metrics of the run file at the row's relevance level."""
    result = compute_metrics(read_run(run_path), load_qrels(row.data, row.split), [m.name for m in row.metrics],
                             relevance_level=row.relevance_level)
    return result.aggregate


def display(command: Sequence[str]) -> str:
    return "research " + shlex.join(command)


@dataclass
class RowResult:
    row: Row
    measured: dict[str, float]
    status: str  # pass | FAIL | measured | error | skipped
    seconds: float | None = None
    message: str = ""


def run_row(row: Row, out: Path, reuse: bool = False) -> RowResult:
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    run_path, log_path = row.run_file(out), out / layout.ROW_LOG
    if not (reuse and run_path.is_file()):
        for command in row.commands(out):
            print(f"[{row.name}] {display(command)}", flush=True)
            with open(log_path, "a", encoding="utf-8") as log:
                log.write(f"\n===== {display(command)}\n")
                log.flush()
                code = subprocess.run([*layout.RESEARCH_PROGRAM, *command], stdout=log,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
            if code != 0:
                tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
                return RowResult(row, {}, "error", time.perf_counter() - started,
                                 f"exit code {code}: {' | '.join(tail)} (log: {log_path})")
    if not run_path.is_file():
        return RowResult(row, {}, "error", time.perf_counter() - started, f"no run file {run_path}")
    measured = score_run(row, run_path)
    statuses = [m.check(measured.get(m.name)) for m in row.metrics]
    status = "FAIL" if "FAIL" in statuses else "error" if "error" in statuses else \
        "pass" if "pass" in statuses else "measured"
    seconds = time.perf_counter() - started
    write_json(out / layout.ROW_RESULT, {"row": row.name, "kind": row.kind, "measured": measured, "status": status,
                                        "relevance_level": row.relevance_level, "seconds": round(seconds, 1)})
    return RowResult(row, measured, status, seconds)


def markdown_table(title: str, results: Sequence[RowResult], out: Path) -> str:
    lines = [f"# {title}", "",
             "| row | what | metric | published | expected | measured | Δ (measured − expected) | tolerance | status |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for result in results:
        row = result.row
        for target in row.metrics:
            value = result.measured.get(target.name)
            delta = "—" if value is None or target.expected is None else f"{round(value - target.expected, 4) + 0.0:+.4f}"
            status = result.status if result.status in ("skipped", "error") else target.check(value)
            metric = target.name + (f" (rel ≥ {row.relevance_level})" if row.relevance_level != 1 and
                                    not target.name.startswith("nDCG") else "")
            lines.append(f"| {row.name} | {row.describe()} | {metric} | {_num(target.published)} | {_num(target.expected)} | "
                         f"{_num(value)} | {delta} | ±{target.tolerance:g} | {status} |")
    lines += ["", "Commands (outputs under `" + str(out) + "/<row>`):", ""]
    for result in results:
        for command in result.row.commands(out / result.row.name):
            lines.append(f"- `{result.row.name}`: `{display(command)}`")
    notes = [f"- `{r.row.name}`: " + " — ".join(t for t in (r.row.source, r.row.notes) if t)
             for r in results if r.row.source or r.row.notes]
    if notes:
        lines += ["", "Sources and notes:", "", *notes]
    errors = [f"- `{r.row.name}`: {r.message}" for r in results if r.message]
    if errors:
        lines += ["", *errors]
    return "\n".join(lines) + "\n"


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def reproduce(path: str | Path, only: Sequence[str] | None = None, out: str | Path | None = None,
              table: str | Path | None = None, reuse: bool = False, dry_run: bool = False,
              include_disabled: bool = False) -> int:
    """Run the rows, print measured vs expected, write ``<out>/reproduce.md`` (and ``table``); 1 if any failed."""
    raw, rows = load_baselines(path)
    out = Path(out) if out else layout.REPRODUCE_ROOT / Path(path).stem
    if only:
        unknown = sorted(set(only) - {row.name for row in rows})
        if unknown:
            raise BaselineError(f"no row named {', '.join(unknown)} in {path} (rows: {', '.join(r.name for r in rows)})")
    selected = [row for row in rows if (row.name in only if only else row.enabled or include_disabled)]
    results: list[RowResult] = []
    for row in rows:
        if row not in selected:
            results.append(RowResult(row, {}, "skipped", message="" if row.enabled else "disabled (enabled: false)"))
            continue
        if dry_run:
            for command in row.commands(out / row.name):
                print(display(command))
            continue
        result = run_row(row, out / row.name, reuse=reuse)
        results.append(result)
        measured = "  ".join(f"{m.name} {result.measured[m.name]:.4f} (expected {_num(m.expected)} ±{m.tolerance:g})"
                             for m in row.metrics if m.name in result.measured)
        print(f"[{row.name}] {result.status}: {measured or result.message}"
              + (f"  ({result.seconds:.0f} s)" if result.seconds else ""), flush=True)
    if dry_run:
        return 0
    text = markdown_table(raw.get("title") or f"Baselines: {Path(path).name}", results, out)
    for target in [out / layout.REPRODUCE_TABLE, *([Path(table)] if table else [])]:
        with atomic_write(target) as handle:
            handle.write(text)
    print()
    print(text)
    failed = [r for r in results if r.status in ("FAIL", "error")]
    print(f"{sum(r.status == 'pass' for r in results)} passed, {len(failed)} failed, "
          f"{sum(r.status == 'measured' for r in results)} measured only, "
          f"{sum(r.status == 'skipped' for r in results)} skipped; table: {out / layout.REPRODUCE_TABLE}")
    return 1 if failed else 0
