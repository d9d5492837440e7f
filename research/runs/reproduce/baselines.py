"""Reading a baselines file: its rows, the references between them (``{row: NAME}``, ``${rows.NAME.out}``), and the
order that runs every row after the rows it consumes; every problem one line naming the file and the line."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from research.errors import ResearchError
from research.eval.metrics import QUERIES_WITHOUT_RELEVANT, parse_metric
from research.io import read_yaml_file, yaml_location
from research.runs.reproduce.rows import (
    OWN_FOLDER,
    REFERENCE,
    ROW_KINDS,
    CommandRow,
    DenseEvalRow,
    FitEvalRow,
    MetricTarget,
    RerankRow,
    Row,
    ScoreRow,
)

DEFAULTS = ("data", "split", "relevance_level", "queries_without_relevant", "tolerance", "top_k", "precision")
COMMON = ("name", "kind", "data", "split", "metrics", "relevance_level", "queries_without_relevant", "enabled", "source",
          "notes", "top_k", "precision", "tolerance")
NAME = re.compile(r"[A-Za-z0-9_-]+")  # no dots: ``${rows.NAME.OUTPUT}`` splits on them


class BaselineError(ResearchError):
    """A baselines file is invalid."""


@dataclass
class Baselines:
    path: Path
    raw: dict[str, Any]
    rows: list[Row]

    @property
    def by_name(self) -> dict[str, Row]:
        return {row.name: row for row in self.rows}

    @property
    def title(self) -> str:
        return self.raw.get("title") or f"Baselines: {self.path.name}"


# ---------------------------------------------------------------- where in the file
def _row_nodes(path: Path) -> list[Any]:
    import yaml

    try:
        root = yaml.compose(path.read_text(encoding="utf-8-sig"), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []
    for key, value in root.value if isinstance(root, yaml.MappingNode) else ():
        if key.value == "rows" and isinstance(value, yaml.SequenceNode):
            return list(value.value)
    return []


def _scalars(node: Any, key: str | None = None) -> Iterator[tuple[str | None, Any]]:
    """(the mapping key above, scalar node) of every scalar below ``node``."""
    import yaml

    if isinstance(node, yaml.ScalarNode):
        yield key, node
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            yield from _scalars(item, key)
    elif isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            yield from _scalars(v, k.value)


def where(path: Path, index: int, name: str | None, key: str | None = None, reference: str | None = None) -> str:
    """``FILE:LINE: row 'NAME'``: the line of the row's ``key`` or of its first reference to the row ``reference``
    (else the row's first line)."""
    nodes = _row_nodes(path)
    line = None
    if index < len(nodes):
        node = nodes[index]
        line = node.start_mark.line + 1
        pairs = [item for item in node.value if isinstance(item, tuple)] if isinstance(node.value, list) else []
        keys = [k for k, _ in pairs if k.value == key] if key else []
        pattern = re.compile(r"\$\{rows\." + re.escape(reference) + r"[.}]") if reference else None
        found = [s for above, s in _scalars(node) if pattern is not None and
                 ((above == "row" and s.value == reference) or pattern.search(str(s.value)))]
        if keys or found:
            line = (keys or found)[0].start_mark.line + 1
    if line is None:
        return f"{yaml_location(path, 'rows')}" + (f" row {name!r}" if name else f" row {index + 1}")
    return f"{path}:{line}: row {name!r}" if name else f"{path}:{line}: row {index + 1}"


# ---------------------------------------------------------------- references
def _references(value: Any, where_: str) -> Any:
    """``{row: NAME[, output: OUT][, path: SUB]}`` anywhere in a field becomes the string ``${rows.NAME[.OUT]}[/SUB]``."""
    if isinstance(value, dict):
        if "row" not in value:
            return value
        bad = sorted(set(value) - {"row", "output", "path"})
        if bad or not isinstance(value["row"], str):
            raise BaselineError(f"{where_}: a reference is {{row: NAME, output: OUTPUT, path: SUB}}, got {value!r}")
        text = "${rows." + value["row"] + (f".{value['output']}" if value.get("output") else "") + "}"
        return text + (f"/{value['path']}" if value.get("path") else "")
    if isinstance(value, list):
        return [_references(v, where_) for v in value]
    return value


def _needs(row: Row) -> tuple[str, ...]:
    names: list[str] = []
    for key in row.reference_fields:
        value = getattr(row, key)
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str):
                names += [m.group(1) for m in REFERENCE.finditer(text) if m.group(1) not in names]
    return tuple(names)


def substitute(text: str, rows: dict[str, Row], root: Path) -> str:
    """``${rows.NAME[.OUTPUT]}`` replaced by that output's path when the rows' folders are ``root/<name>``."""
    def path(match: re.Match) -> str:
        producer = rows[match.group(1)]
        out = root / producer.name
        return str(producer.outputs(out)[match.group(2)] if match.group(2) else producer.main_output_path(out))

    return REFERENCE.sub(path, text)


def resolve(row: Row, rows: dict[str, Row], root: Path) -> Row:
    """The row with every reference to another row's output replaced by its path under ``root``."""
    return row.resolved(lambda text: substitute(text, rows, root))


def _check_references(path: Path, rows: list[Row]) -> None:
    by_name = {row.name: row for row in rows}
    for index, row in enumerate(rows):
        for key in row.reference_fields:
            value = getattr(row, key)
            for text in value if isinstance(value, list) else [value]:
                for match in REFERENCE.finditer(text) if isinstance(text, str) else ():
                    name, output = match.groups()
                    at = where(path, index, row.name, reference=name)
                    if name not in by_name:
                        raise BaselineError(f"{at}: field {key!r}: no row named {name!r} "
                                            f"(rows: {', '.join(by_name)})")
                    offered = by_name[name].outputs(Path(name))
                    if output is not None and output not in offered:
                        raise BaselineError(f"{at}: field {key!r}: row {name!r} ({by_name[name].kind}) has no "
                                            f"output {output!r} (it has {', '.join(offered)})")
                    if name == row.name:
                        raise BaselineError(f"{at}: field {key!r}: a row cannot consume its own output "
                                            f"(use {OWN_FOLDER} for its folder)")


def run_order(baselines: Baselines, names: Sequence[str]) -> list[Row]:
    """The rows ``names`` and every row they consume, each after the rows it consumes (file order otherwise)."""
    by_name, state = baselines.by_name, {}

    def visit(name: str, chain: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = chain[chain.index(name):] + [name]
            index = next(i for i, r in enumerate(baselines.rows) if r.name == chain[-1])
            raise BaselineError(f"{where(baselines.path, index, chain[-1], reference=name)}: rows consume each other in a "
                                f"cycle: {' -> '.join(cycle)}")
        state[name] = "visiting"
        for need in by_name[name].needs:
            visit(need, [*chain, name])
        state[name] = "done"

    for name in names:
        visit(name, [])
    # the earliest row in the file whose consumed rows have all run, again and again: file order where it can be
    pending, order, emitted = [r for r in baselines.rows if r.name in state], [], set()
    while pending:
        ready = next(r for r in pending if set(r.needs) <= emitted)
        pending.remove(ready)
        order.append(ready)
        emitted.add(ready.name)
    return order


# ---------------------------------------------------------------- rows
def parse_row(raw: dict[str, Any], defaults: dict[str, Any], path: Path, index: int) -> Row:
    if not isinstance(raw, dict):
        raise BaselineError(f"{where(path, index, None)}: a row must be a mapping")
    merged = {**{k: v for k, v in defaults.items() if k in DEFAULTS}, **raw}
    name = merged.get("name")
    if not name or not isinstance(name, str):
        raise BaselineError(f"{where(path, index, None)}: row without a 'name'")
    at = where(path, index, name)
    if not NAME.fullmatch(name):
        raise BaselineError(f"{at}: a row name is letters, digits, '-' and '_' (it names a folder and a reference)")
    kind = merged.get("kind")
    cls = ROW_KINDS.get(kind)
    if cls is None:
        raise BaselineError(f"{where(path, index, name, 'kind')}: unknown kind {kind!r} (one of {', '.join(ROW_KINDS)})")
    unknown = sorted(set(merged) - set(COMMON) - set(cls.fields))
    if unknown:
        raise BaselineError(f"{where(path, index, name, unknown[0])} ({kind}): unknown key(s) {', '.join(unknown)}")
    if "data" not in merged:
        raise BaselineError(f"{at}: no 'data' (set it on the row or at the top of the file)")
    metrics = _metrics(merged, cls, where(path, index, name, "metrics"))
    if merged.get("queries_without_relevant", QUERIES_WITHOUT_RELEVANT[0]) not in QUERIES_WITHOUT_RELEVANT:
        raise BaselineError(f"{where(path, index, name, 'queries_without_relevant')}: "
                            f"queries_without_relevant {merged['queries_without_relevant']!r} is not one of "
                            f"{', '.join(QUERIES_WITHOUT_RELEVANT)}")
    kwargs = {k: merged[k] for k in ("name", "split", "relevance_level", "queries_without_relevant", "enabled",
                                      "source", "notes", "top_k", "precision") if k in merged}
    kwargs.update({k: _references(merged[k], where(path, index, name, k)) for k in ("data", *cls.fields)
                   if k in merged})
    for key in ("configs", "args", "train", "train_args", "command"):
        if isinstance(kwargs.get(key), str):
            kwargs[key] = [kwargs[key]]
    if kwargs.get("interpolate") is not None and kwargs.get("interpolate_on") is not None:
        raise BaselineError(f"{where(path, index, name, 'interpolate_on')} ({kind}): give 'interpolate' (a fixed "
                            "weight) or 'interpolate_on' (a split to choose it on), not both")
    row = cls(metrics=metrics, **kwargs)
    row.needs = _needs(row)
    required = {DenseEvalRow: ("model", "'model' is required"), FitEvalRow: ("configs", "'configs' is required"),
                RerankRow: ("model", "'model' or 'train' configs are required"),
                CommandRow: ("command", "'command' (one or more command lines) is required")}
    if type(row) in required:
        key, message = required[type(row)]
        if not (getattr(row, key) or (isinstance(row, RerankRow) and row.train)):
            raise BaselineError(f"{at} ({kind}): {message}")
    if isinstance(row, ScoreRow) and not (isinstance(row.run, str) and REFERENCE.search(row.run)):
        # a file from outside the baselines is an artefact no row reproduces
        raise BaselineError(f"{where(path, index, name, 'run')} ({kind}): 'run' must name another row's run file "
                            f"({{row: NAME, output: OUTPUT}} or ${{rows.NAME.OUTPUT}}), got {row.run!r}")
    return row


def _metrics(merged: dict[str, Any], cls: type[Row], at: str) -> list[MetricTarget]:
    tolerance = float(merged.get("tolerance", 0.002))
    raw = merged.get("metrics")
    if raw is None and cls.may_produce_only:
        return []
    if not isinstance(raw, dict) or not raw:
        raise BaselineError(f"{at}: 'metrics' must map metric names to {{expected, published, tolerance}}")
    metrics = []
    for metric, spec in raw.items():
        try:
            family, k = parse_metric(metric)
        except ValueError as err:
            raise BaselineError(f"{at}: {err}") from None
        spec = spec if isinstance(spec, dict) else {"expected": spec}
        bad = sorted(set(spec) - {"expected", "published", "tolerance"})
        if bad:
            raise BaselineError(f"{at}: metric {metric}: unknown key(s) {', '.join(bad)}")
        metrics.append(MetricTarget(f"{family}@{k}", _float(spec.get("expected")), _float(spec.get("published")),
                                    float(spec.get("tolerance", tolerance))))
    return metrics


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def load_baselines(path: str | Path) -> tuple[dict[str, Any], list[Row]]:
    """``(the file's mapping, its rows)``: :func:`read_baselines` in the shape the configs test reads."""
    baselines = read_baselines(path)
    return baselines.raw, baselines.rows


def read_baselines(path: str | Path) -> Baselines:
    """The file's rows, each reference checked against the rows it names, with no cycle among them."""
    path = Path(path)
    raw = read_yaml_file(path, "baselines file")  # missing, non-UTF-8, YAML syntax: one line naming file and line
    if not isinstance(raw, dict) or not isinstance(raw.get("rows"), list):
        raise BaselineError(f"{path}: expected a mapping with a 'rows' list")
    unknown = sorted(set(raw) - set(DEFAULTS) - {"rows", "title", "description"})
    if unknown:
        raise BaselineError(f"{yaml_location(path, unknown[0])} unknown top-level key(s) {', '.join(unknown)}")
    rows = [parse_row(r, raw, path, i) for i, r in enumerate(raw["rows"])]
    seen: set[str] = set()
    for index, row in enumerate(rows):
        if row.name in seen:
            raise BaselineError(f"{where(path, index, row.name, 'name')}: duplicate row name {row.name!r}")
        seen.add(row.name)
    baselines = Baselines(path, raw, rows)
    _check_references(path, rows)
    run_order(baselines, [row.name for row in rows])  # a cycle anywhere in the file is refused on loading
    return baselines
