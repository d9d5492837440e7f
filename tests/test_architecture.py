"""The house rules of docs/architecture.md that ruff and import-linter do not check: no source file over 450 lines,
and every package says in its ``__init__.py`` docstring what lives there."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE_ROOTS = ("research", "modules", "datamodules", "benchmarks")
MAX_LINES = 450


def source_files() -> list[Path]:
    return sorted(p for root in SOURCE_ROOTS for p in (REPO / root).rglob("*.py"))


def test_no_source_file_is_over_450_lines():
    long = {str(p.relative_to(REPO)): n for p in source_files() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by job (docs/architecture.md): {long}"


def test_every_package_says_what_lives_there():
    packages = [p for p in source_files() if p.name == "__init__.py"]
    assert len(packages) >= 10
    silent = [str(p.relative_to(REPO)) for p in packages if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not silent, f"packages without a docstring: {silent}"
