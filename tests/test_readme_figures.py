"""Every 4-decimal figure of the README's "Measured on ..." tables is held by a committed reproduce table
(experiments/results/reproduce-*.json, beside its .md) and expected by a row of a baselines file; the ones not yet
regenerated are listed by row, and the test fails on any other missing figure or on a listed row that is done."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from research.runs.reproduce import load_baselines

REPO = Path(__file__).resolve().parents[1]
FIGURE = re.compile(r"^\d\.\d{4}$")

# Rows whose regeneration (research reproduce ... --only ROW --table experiments/results/reproduce-scifact.md) has
# not run since the baselines file was rewritten: hours of CPU training (cross-encoder stages 2-4 about 3 h; zELO
# votes and student about 1.5 h). Remove a row here once its table holds it.
AWAITING_REGENERATION = {
    "cross-encoder-stage2", "cross-encoder-stage3", "cross-encoder-stage4", "zelo-student",
}


@dataclass(frozen=True)
class System:
    label: str
    figures: tuple[tuple[str, str], ...]  # (metric, "0.1234")


def readme_systems(text: str) -> list[System]:
    """The systems of every "## Measured on" table: a cell "a / b" is two systems (its other cells shared)."""
    systems, header, inside = [], None, False
    for line in text.splitlines():
        if line.startswith("## "):
            inside, header = line.startswith("## Measured on"), None
            continue
        if not inside or not line.startswith("|"):
            continue
        cells = [c.strip().replace("**", "") for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
            continue
        if set("".join(cells)) <= set("-: "):
            continue
        columns = [(name, cell.split(" / ")) for name, cell in zip(header, cells)
                   if all(FIGURE.match(v) for v in cell.split(" / "))]
        width = max((len(values) for _, values in columns), default=0)
        for i in range(width):
            figures = tuple((name, values[i] if len(values) > 1 else values[0]) for name, values in columns)
            systems.append(System(cells[0] + (f" [{i + 1} of {width}]" if width > 1 else ""), figures))
    return systems


def committed_rows() -> dict[tuple[str, str], dict[str, str]]:
    """(results file, row) -> the row's measured values to 4 decimals, from every committed results JSON."""
    found = {}
    for path in sorted((REPO / "experiments" / "results").glob("reproduce-*.json")):
        for name, record in json.loads(path.read_text()).get("rows", {}).items():
            if record.get("status") != "error" and record.get("measured"):
                found[(path.name, name)] = {m: f"{v:.4f}" for m, v in record["measured"].items()}
    return found


def expecting_rows() -> dict[str, dict[str, str]]:
    """Baseline row -> its expected values to 4 decimals, over every baselines file."""
    found = {}
    for path in sorted((REPO / "experiments" / "baselines").glob("*.yaml")):
        for row in load_baselines(path)[1]:
            found[row.name] = {t.name: f"{t.expected:.4f}" for t in row.metrics if t.expected is not None}
    return found


def matches(system: System, values: dict[str, str]) -> bool:
    return all(values.get(metric) == value for metric, value in system.figures)


def test_the_readme_table_is_parsed():
    systems = readme_systems((REPO / "README.md").read_text())
    assert len(systems) >= 10 and all(len(s.figures) == 4 for s in systems), systems
    assert systems[0].label.startswith("BM25") and dict(systems[0].figures) == {
        "nDCG@10": "0.6863", "RR@10": "0.6492", "R@100": "0.9127", "AP@100": "0.6439"}
    pair = [s for s in systems if s.label.endswith("of 2]")]  # "0.6766 / 0.6584": two systems, shared R@100
    assert [dict(s.figures)["nDCG@10"] for s in pair] == ["0.6766", "0.6584"]
    assert {dict(s.figures)["R@100"] for s in pair} == {"0.9127"}


def test_every_readme_figure_is_in_a_committed_reproduce_table():
    systems = readme_systems((REPO / "README.md").read_text())
    expected, committed = expecting_rows(), committed_rows()
    unowned = [s.label for s in systems if not any(matches(s, values) for values in expected.values())]
    assert not unowned, f"README systems whose figures no baselines row expects: {unowned}"
    row_of = {s: next(name for name, values in expected.items() if matches(s, values)) for s in systems}
    missing = [s for s in systems if not any(matches(s, values) for values in committed.values())]
    def report(systems: list[System]) -> str:
        return "; ".join(f"{s.label} (row {row_of[s]}): " + ", ".join(f"{m} {v}" for m, v in s.figures) for s in systems)

    unexpected = [s for s in missing if row_of[s] not in AWAITING_REGENERATION]
    assert not unexpected, f"README figures that no committed reproduce table holds: {report(unexpected)}"
    done = sorted(AWAITING_REGENERATION - {row_of[s] for s in missing})
    assert not done, f"rows regenerated, take them off AWAITING_REGENERATION: {done}"
    if missing:
        pytest.xfail(f"not regenerated yet (rows {', '.join(sorted(AWAITING_REGENERATION))}): {report(missing)}")
