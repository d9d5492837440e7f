"""The results of a reproduce run: one record per row, the JSON that keeps them beside the markdown table, and the
table itself (metrics against expectations; per row its wall time and where its result came from)."""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from research.io import atomic_write, write_json
from research.runs.reproduce.baselines import BaselineError, Baselines
from research.runs.reproduce.rows import Row, by_name

RAN, REUSED, KEPT = "ran", "reused", "kept"
NOT_RUN, SKIPPED = "not run", "skipped"


@dataclass
class RowResult:
    row: Row  # as the file spells it (references by name, not by path)
    measured: dict[str, float]
    status: str  # pass | FAIL | measured | error | done (produced, scores nothing) | skipped | not run
    seconds: float | None = None
    message: str = ""
    origin: str = RAN  # ran (now) | reused (its output, with --reuse) | kept (from the previous table) | "" (none)
    finished: str | None = None  # when the result was made (UTC)
    reused: str | None = None  # the reused file and its modification time
    commands: list[str] = field(default_factory=list)
    made_by: list[str] | None = None  # kept: the definition() of the row that made the result

    @property
    def definition_changed(self) -> bool:
        """Kept, but the row's commands differ from the ones that made the result."""
        return self.made_by is not None and self.made_by != definition(self.row)


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def utc_time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def display(argv: Sequence[str]) -> str:
    return shlex.join(argv)


def definition(row: Row) -> list[str]:
    """The row's commands with references unresolved: equal between two runs exactly when the row is unchanged."""
    return [display(argv) for argv in row.commands(Path("${out}"))]


def row_status(row: Row, measured: dict[str, float]) -> str:
    """``FAIL`` > ``error`` > ``measured`` (a metric without an expectation) > ``pass``; ``done`` without metrics."""
    if not row.metrics:
        return "done"
    statuses = {target.check(measured.get(target.name)) for target in row.metrics}
    return next((s for s in ("FAIL", "error", "measured") if s in statuses), "pass")


def record(result: RowResult) -> dict[str, Any]:
    return {"row": result.row.name, "kind": result.row.kind, "status": result.status, "measured": result.measured,
            "relevance_level": result.row.relevance_level, "queries_without_relevant": result.row.queries_without_relevant,
            "seconds": _round(result.seconds), "finished": result.finished,
            "origin": result.origin, "reused": result.reused, "message": result.message, "commands": result.commands,
            "definition": result.made_by if result.made_by is not None else definition(result.row)}


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 1)


def results_json(table: Path) -> Path:
    """The JSON beside a markdown table (``reproduce-scifact.md`` -> ``reproduce-scifact.json``)."""
    return table.with_suffix(".json")


def read_results(path: Path) -> dict[str, dict[str, Any]]:
    """The rows of an earlier results JSON (none when there is no such file)."""
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")).get("rows", {}))
    except (json.JSONDecodeError, AttributeError):
        raise BaselineError(f"{path}: not a results JSON of research reproduce (remove it to start the table afresh)"
                            ) from None


def complete(baselines: Baselines, now: dict[str, RowResult], previous: dict[str, dict[str, Any]],
             planned: dict[str, list[str]]) -> list[RowResult]:
    """Every row of the file in file order: the result made now, else the previous table's (``kept``), else none
    (with the ``planned`` commands that would make it)."""
    results = []
    for row in baselines.rows:
        if row.name in now:
            results.append(now[row.name])
        elif row.name in previous:
            old = previous[row.name]
            measured = {k: float(v) for k, v in (old.get("measured") or {}).items()}
            status = "error" if old.get("status") == "error" else row_status(row, measured)
            results.append(RowResult(row, measured, status, old.get("seconds"), old.get("message", ""), KEPT,
                                     old.get("finished"), old.get("reused"), list(old.get("commands", [])),
                                     list(old.get("definition") or [])))
        else:
            results.append(RowResult(row, {}, NOT_RUN if row.enabled else SKIPPED, origin="",
                                     commands=planned.get(row.name, [])))
    return results


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def provenance(result: RowResult) -> str:
    if result.origin == RAN:
        return f"ran {result.finished}"
    if result.origin == REUSED:
        return f"reused `{result.reused}`"
    if result.origin == KEPT:
        made = f"reused `{result.reused}`" if result.reused else f"ran {result.finished}"
        return f"kept from the previous table ({made})" + ("; the row's commands changed since" if
                                                            result.definition_changed else "")
    return "disabled (enabled: false)" if result.status == SKIPPED else "—"


def markdown_table(title: str, results: Sequence[RowResult], out: Path, invocation: str = "") -> str:
    lines = [f"# {title}", ""]
    if invocation:
        lines += [f"Written by `{invocation}` at {utc_now()}.", ""]
    lines += ["| row | what | metric | published | expected | measured | Δ (measured − expected) | tolerance | status |",
              "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for result in results:
        row = result.row
        for target in row.metrics:
            value = result.measured.get(target.name)
            delta = "—" if value is None or target.expected is None else f"{round(value - target.expected, 4) + 0.0:+.4f}"
            status = result.status if result.status in (SKIPPED, NOT_RUN, "error") else target.check(value)
            if result.origin in (REUSED, KEPT) and status not in (SKIPPED, NOT_RUN):
                status += f" ({result.origin})"
            metric = target.name + (f" (rel ≥ {row.relevance_level})" if row.relevance_level != 1 and
                                    not target.name.startswith("nDCG") else "")
            lines.append(f"| {row.name} | {row.describe()} | {metric} | {_num(target.published)} | {_num(target.expected)} | "
                         f"{_num(value)} | {delta} | ±{target.tolerance:g} | {status} |")
    lines += ["", "| row | consumes | status | wall time | result |", "|---|---|---|---:|---|"]
    for result in results:
        lines.append(f"| {result.row.name} | {', '.join(result.row.needs) or '—'} | {result.status} | "
                     f"{duration(result.seconds)} | {provenance(result)} |")
    timed = [r.seconds for r in results if r.seconds is not None]
    lines += ["", f"Wall time of the {len(timed)} timed rows together: {duration(sum(timed))} (a row's time is that of "
              "the run that made its result; reused and kept rows show the original run's)."]
    lines += ["", "Commands (outputs under `" + str(out) + "/<row>`):", ""]
    for result in results:
        for command in result.commands:
            lines.append(f"- `{result.row.name}`: `{command}`")
    notes = [f"- `{r.row.name}`: " + " — ".join(by_name(t) for t in (r.row.source, r.row.notes) if t)
             for r in results if r.row.source or r.row.notes]
    if notes:
        lines += ["", "Sources and notes:", "", *notes]
    errors = [f"- `{r.row.name}`: {r.message}" for r in results if r.message]
    if errors:
        lines += ["", *errors]
    return "\n".join(lines) + "\n"


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def write_table(target: Path, baselines: Baselines, now: dict[str, RowResult], planned: dict[str, list[str]],
                out: Path, invocation: str) -> str:
    """``target`` (markdown) and the JSON beside it: the rows run now, the others kept from that JSON."""
    json_path = results_json(target)
    previous = read_results(json_path)
    results = complete(baselines, now, previous, planned)
    text = markdown_table(baselines.title, results, out, invocation)
    kept = {r.row.name: previous[r.row.name] for r in results if r.origin == KEPT}  # as its run recorded it
    write_json(json_path, {"title": baselines.title, "file": str(baselines.path), "written": utc_now(),
                           "rows": {r.row.name: kept.get(r.row.name) or record(r) for r in results if r.origin}})
    with atomic_write(target) as handle:
        handle.write(text)
    return text
