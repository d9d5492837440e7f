"""Running rows: each after the rows it consumes, from nothing (its old outputs deleted first) unless ``--reuse``;
its run file re-scored here; the table written beside the results JSON that keeps the rows not run this time."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from research.data.beir import resolve_dataset
from research.data.trec import read_run, read_tsv_qrels
from research.errors import ResearchError
from research.eval.metrics import compute_metrics
from research.io import write_json
from research.runs import layout
from research.runs.reproduce.baselines import BaselineError, read_baselines, resolve, run_order
from research.runs.reproduce.rows import Row
from research.runs.reproduce.table import (
    RAN,
    REUSED,
    RowResult,
    display,
    record,
    row_status,
    utc_now,
    utc_time,
    write_table,
)


def load_qrels(data: str, split: str):
    path = resolve_dataset(data) / "qrels" / f"{split}.tsv"
    if not path.is_file():
        raise ResearchError(f"{path}: no qrels for split {split!r}")
    return read_tsv_qrels(path)


def score_run(row: Row, run_path: Path) -> dict[str, float]:
    """The row's metrics of the run file at the row's relevance level."""
    result = compute_metrics(read_run(run_path), load_qrels(row.data, row.split), [m.name for m in row.metrics],
                             relevance_level=row.relevance_level, queries_without_relevant=row.queries_without_relevant)
    return result.aggregate


def program(argv: Sequence[str]) -> list[str]:
    """``research ...`` runs as :data:`layout.RESEARCH_PROGRAM` (read now, so that tests can swap it)."""
    return [*layout.RESEARCH_PROGRAM, *argv[1:]] if argv and argv[0] == "research" else list(argv)


def row_environment() -> dict[str, str]:
    """The environment of a row's commands: a script (``bash ...``) finds this very ``research`` program and Python
    in ``$RESEARCH`` and ``$PYTHON``, whatever the PATH."""
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "RESEARCH": shlex.join(layout.RESEARCH_PROGRAM),
            "PYTHON": sys.executable}


def clear(out: Path, extra: Sequence[Path]) -> None:
    """Delete the row's folder and its outputs elsewhere, so that nothing an earlier run left can be scored."""
    guarded = {Path.cwd().resolve(), out.resolve()}  # never the working folder, the out root, or a folder above them
    guarded |= {parent for path in list(guarded) for parent in path.parents}
    for path in extra:
        if path.resolve() in guarded:
            raise BaselineError(f"refusing to delete {path} (an output must be a file or folder of its own)")
    for path in [out, *extra]:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _earlier_seconds(out: Path) -> float | None:
    """The wall time recorded by the run that made a reused output (unknown when it left no record)."""
    try:
        return json.loads((out / layout.ROW_RESULT).read_text(encoding="utf-8")).get("seconds")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def run_row(row: Row, out: Path, reuse: bool = False, definition_row: Row | None = None) -> RowResult:
    """Run one row whose references are resolved (its results carry ``definition_row``, the row as written)."""
    started = time.perf_counter()
    written = definition_row or row
    target = row.run_path(out) if row.metrics else row.main_output_path(out)
    commands = [display(argv) for argv in row.commands(out)]
    if reuse and target.exists():
        measured = score_run(row, target) if row.metrics else {}
        return RowResult(written, measured, row_status(row, measured), _earlier_seconds(out), origin=REUSED,
                         finished=utc_now(), reused=f"{target} (modified {utc_time(target.stat().st_mtime)})",
                         commands=commands)
    clear(out, row.extra_outputs(out))
    out.mkdir(parents=True)
    log_path = out / layout.ROW_LOG
    for argv, shown in zip(row.commands(out), commands):
        print(f"[{row.name}] {shown}", flush=True)
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"\n===== {shown}\n")
            log.flush()
            code = subprocess.run(program(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  env=row_environment()).returncode
        if code != 0:
            tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
            return RowResult(written, {}, "error", time.perf_counter() - started,
                             f"exit code {code}: {' | '.join(tail)} (log: {log_path})", finished=utc_now(),
                             commands=commands)
    if not target.exists():
        return RowResult(written, {}, "error", time.perf_counter() - started,
                         f"its commands exited 0 without writing {target}", finished=utc_now(), commands=commands)
    measured = score_run(row, target) if row.metrics else {}
    result = RowResult(written, measured, row_status(row, measured), time.perf_counter() - started, origin=RAN,
                       finished=utc_now(), commands=commands)
    write_json(out / layout.ROW_RESULT, record(result))
    return result


def reproduce(path: str | Path, only: Sequence[str] | None = None, out: str | Path | None = None,
              table: str | Path | None = None, reuse: bool = False, dry_run: bool = False,
              include_disabled: bool = False, strict: bool = False) -> int:
    """Run the selected rows (``only``, else the enabled ones, else all) and every row they consume, consumed rows
    first; write ``<out>/reproduce.md`` (and ``table``), each with its results JSON; 1 if a row run now failed
    (``strict``: or measured a value it has no expectation for)."""
    baselines = read_baselines(path)
    rows = baselines.by_name
    root = Path(out) if out else layout.REPRODUCE_ROOT / Path(path).stem
    if only:
        unknown = sorted(set(only) - set(rows))
        if unknown:
            raise BaselineError(f"no row named {', '.join(unknown)} in {path} (rows: {', '.join(rows)})")
    wanted = list(only) if only else [r.name for r in baselines.rows if r.enabled or include_disabled]
    order = run_order(baselines, wanted)
    planned = {row.name: [display(a) for a in resolve(row, rows, root).commands(root / row.name)]
               for row in baselines.rows}
    if dry_run:
        for row in order:
            print(f"# {row.name}" + (f" (consumes {', '.join(row.needs)})" if row.needs else ""))
            print("\n".join(planned[row.name]))
        return 0
    results: dict[str, RowResult] = {}
    for row in order:
        failed = [name for name in row.needs if results[name].status == "error"]
        if failed:
            result = RowResult(row, {}, "error", message=f"not run: it consumes {', '.join(failed)}, which did not "
                                                         "finish", finished=utc_now(), commands=planned[row.name])
        else:
            result = run_row(resolve(row, rows, root), root / row.name, reuse=reuse, definition_row=row)
        results[row.name] = result
        measured = "  ".join(f"{m.name} {result.measured[m.name]:.4f} (expected "
                             f"{'—' if m.expected is None else f'{m.expected:.4f}'} ±{m.tolerance:g})"
                             for m in row.metrics if m.name in result.measured)
        print(f"[{row.name}] {result.status}{' (reused)' if result.origin == REUSED else ''}: "
              f"{measured or result.message or 'outputs written'}"
              + (f"  ({result.seconds:.0f} s)" if result.seconds else ""), flush=True)
    invocation = "research reproduce " + " ".join([str(path), *(["--only", *only] if only else []),
                                                   *(["--all"] if include_disabled else []),
                                                   *(["--reuse"] if reuse else []), *(["--strict"] if strict else [])])
    text = ""
    for target in [root / layout.REPRODUCE_TABLE, *([Path(table)] if table else [])]:
        text = write_table(target, baselines, results, planned, root, invocation)
    print()
    print(text)
    bad = ("FAIL", "error", "measured") if strict else ("FAIL", "error")
    failed = [r for r in results.values() if r.status in bad]
    count = {s: sum(r.status == s for r in results.values()) for s in ("pass", "measured", "done")}
    print(f"{count['pass']} passed, {len(failed)} failed{' (--strict: measured counts)' if strict else ''}, "
          f"{count['measured']} measured without an expectation, {count['done']} produced outputs only; "
          f"table: {root / layout.REPRODUCE_TABLE}")
    return 1 if failed else 0
