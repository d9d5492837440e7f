"""Every malformed input of tests/malformed/cases.yaml through the CLI that reads it.

A bad file is one line on stderr, ``research: error: FILE:LINE: field 'FIELD' ...``, exit code 2, no traceback; an
accepted one (CRLF, a BOM, blank lines, a huge but valid line) exits 0. Cases run in-process through
``research.cli.main`` (MS MARCO through ``python -m research.data.msmarco``'s ``main``), a few also as subprocesses.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from research.cli.main import main
from research.data import msmarco
from research.errors import run_tool

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "malformed"
MANIFEST = yaml.safe_load((CORPUS / "cases.yaml").read_text(encoding="utf-8"))
KINDS, CASES = MANIFEST["kinds"], MANIFEST["cases"]
HUGE = 8 * 1024 * 1024  # bytes of the generated huge lines
# read while `research fit` runs (after Lightning logged its setup): the error is the last stderr line
FIT_KINDS = {kind for kind, spec in KINDS.items() if "config" in spec}


def _fill(data: bytes, values: dict[str, str]) -> bytes:
    for key, value in values.items():
        data = data.replace(b"{" + key.encode() + b"}", value.encode())
    return data


def _generate(name: str, path: Path) -> None:
    """The huge cases, written at test time (nothing of that size is committed)."""
    base = (CORPUS / "base" / "beir" / "corpus.jsonl").read_bytes()
    if name == "huge_valid_document":  # one document of 8 MB: valid, read as any other
        path.write_bytes(base + b'{"_id": "d5", "title": "", "text": "' + b"orbit " * (HUGE // 6) + b'"}\n')
    elif name == "huge_invalid_line":  # 8 MB of garbage on line 3: the error quotes none of it
        lines = base.splitlines(keepends=True)
        path.write_bytes(b"".join(lines[:2]) + b"x" * HUGE + b"\n" + b"".join(lines[2:]))
    elif name == "huge_run_field":  # a run line whose score is 8 MB long
        path.write_bytes(b"q1 Q0 d1 1 2.5 bm25\nq1 Q0 d4 2 " + b"9" * HUGE + b" bm25\n")
    else:
        raise ValueError(f"unknown generator {name!r}")


def prepare(case: dict, work: Path, model_dir: Path) -> tuple[str, list[str], dict[str, str]]:
    """(tool, argv, placeholders) for a case: the dataset copy, the case file put in place, templates filled."""
    kind = KINDS[case["kind"]]
    data, out = work / "data", work / "out"
    shutil.copytree(CORPUS / "base" / "beir", data)
    values = {"model": str(model_dir), "data": str(data), "out": str(out), "base": str(CORPUS / "base"),
              "work": str(work)}
    source = CORPUS / case["file"] if "file" in case else None
    target = (data / kind["place"]) if "place" in kind else work / (Path(case.get("file", "input")).name)
    if "generate" in case:
        _generate(case["generate"], target)
    elif source is not None:
        raw = source.read_bytes()
        target.write_bytes(_fill(raw, values) if kind.get("template") else raw)
    values["file"] = str(target)
    if "config" in kind:  # a base config naming the case file
        config = work / "fit.yaml"
        config.write_bytes(_fill((CORPUS / "base" / kind["config"]).read_bytes(), values))
        values["config"] = str(config)
    (work / "base.yaml").write_bytes((CORPUS / "base" / "fit.yaml").read_bytes())  # what sweep files name
    argv = [_fill(arg.encode(), values).decode() for arg in shlex.split(case.get("command", kind["command"]))]
    return kind.get("tool", "research"), argv, values


def run_case(tool: str, argv: list[str]) -> int:
    return run_tool(msmarco.main, argv) if tool == "msmarco" else main(argv)


def expected_error(case: dict, values: dict[str, str]) -> re.Pattern:
    expect = case["expect"]
    where = _fill(expect.get("file", KINDS[case["kind"]].get("error_file", "{file}")).encode(), values).decode()
    line, field = expect.get("line"), expect.get("field")
    message = _fill(expect.get("message", "").encode(), values).decode()
    if not where:  # an error about something that is not a file's content (a model or dataset that is not there)
        return re.compile(rf"research: error: {re.escape(message)}.*")
    prefix = re.escape(where) + (f":{line}:" if line is not None else ":")
    if field is not None:
        prefix += re.escape(f" field '{field}'")
    return re.compile(rf"research: error: {prefix} .*{re.escape(message)}.*")


def check(case: dict, code: int, stderr: str, values: dict[str, str]) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    if case["expect"] == "accepted":
        assert code == 0, stderr
        assert not [line for line in lines if line.startswith("research: error")], stderr
        return
    assert code == 2, stderr
    errors = [line for line in lines if line.startswith("research: error:")]
    if case["kind"] in FIT_KINDS or case["expect"].get("file") == "":  # raised after Lightning's setup logs
        assert errors == [lines[-1]], stderr
    else:
        assert errors == lines, stderr  # nothing else on stderr
    assert len(errors) == 1, stderr
    assert len(errors[0]) < 1000, "the error line quotes too much"
    pattern = expected_error(case, values)
    assert pattern.fullmatch(errors[0]), f"\n  got:      {errors[0]}\n  expected: {pattern.pattern}"


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_malformed_input(case, tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    tool, argv, values = prepare(case, tmp_path, tiny_model_dir)
    capsys.readouterr()
    code = run_case(tool, argv)
    check(case, code, capsys.readouterr().err, values)
    if case["expect"] != "accepted":
        out = Path(values["out"])
        produced = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
        assert not [p for p in produced if p.suffix in (".trec", ".jsonl", ".ckpt", ".safetensors")], produced


def test_manifest_covers_every_file():
    """Each committed case file is listed once in the manifest, and every listed file exists."""
    listed = [case["file"] for case in CASES if "file" in case]
    assert len(listed) == len(set(listed)), "a file is listed twice"
    committed = {str(p.relative_to(CORPUS)) for p in CORPUS.rglob("*") if p.is_file()
                 and p.parts[len(CORPUS.parts)] != "base" and p.name not in ("cases.yaml", ".gitattributes")}
    assert committed == set(listed)
    for case in CASES:
        assert case["kind"] in KINDS and (case["expect"] == "accepted" or "line" in case["expect"]), case["id"]


SUBPROCESS_CASES = ["beir-corpus-invalid-json", "config-syntax-error", "msmarco-collection-non-integer-id"]


@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_subprocess_exit_code(case_id, tiny_model_dir, tmp_path):
    case = next(case for case in CASES if case["id"] == case_id)
    tool, argv, values = prepare(case, tmp_path, tiny_model_dir)
    command = [sys.executable, "-m", "research.data.msmarco", *argv] if tool == "msmarco" else \
        [str(Path(sys.executable).with_name("research")), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore",
           "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    check(case, result.returncode, result.stderr, values)
