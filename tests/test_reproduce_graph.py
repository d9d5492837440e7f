"""Rows that consume other rows: references, run order, errors with file and line, outputs deleted before a row
runs, --reuse marked with file and time, rows without an expectation under --strict, wall times, and --only keeping
the other rows' last results from the JSON beside the table."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
import yaml

from research.data.trec import write_run
from research.runs.reproduce import BaselineError, read_baselines, reproduce, resolve, results_json

RUN = {"q1": {"b": 3.0, "c": 2.0, "a": 1.0}, "q2": {f"d{i}": 10.0 - i for i in range(8)}}

# writes its run file (a copy of the template) unless told to skip it; a missing input fails it like a real command
SCRIPT = """\
import pathlib, shutil, sys
name, out, *inputs = sys.argv[1:]
for path in inputs:
    if not pathlib.Path(path).exists():
        sys.exit(f"{name}: missing input {path}")
with open(pathlib.Path(__file__).with_name("calls.log"), "a") as log:
    log.write(name + "\\n")
if out != "-":
    pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(pathlib.Path(__file__).with_name("template.trec"), out)
"""


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    (folder / "qrels").mkdir(parents=True)
    rows = [("q1", "a", 2), ("q1", "b", 1), ("q2", "d1", 2), ("q2", "d2", 1)]
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{g}\n" for q, d, g in rows))
    write_run(tmp_path / "template.trec", RUN)
    (tmp_path / "make.py").write_text(SCRIPT)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def step(name: str, out: str = "${out}/run.trec", *inputs: str) -> str:
    return " ".join([sys.executable, "make.py", name, out, *inputs])


def calls(workspace: Path) -> list[str]:
    log = workspace / "calls.log"
    return log.read_text().split() if log.exists() else []


def write(workspace: Path, rows: list[dict]) -> Path:
    path = workspace / "baselines.yaml"
    path.write_text(yaml.safe_dump({"data": str(workspace / "data"), "tolerance": 0.01, "rows": rows}, sort_keys=False))
    return path


def chain(expected: float | None = None) -> list[dict]:
    """model (produces) -> scored (consumes model, via {row:}) -> fused (consumes both, via ${rows...})."""
    return [
        {"name": "fused", "kind": "command", "enabled": False,
         "command": step("fused", "${out}/run.trec", "${rows.model.out}/weights", "${rows.scored.run}"),
         "metrics": {"nDCG@10": expected}},
        {"name": "model", "kind": "command", "command": step("model", "${out}/weights"), "output": "${out}/weights"},
        {"name": "scored", "kind": "command", "command": [step("scored", "${out}/run.trec", "${rows.model}")],
         "metrics": {"nDCG@10": expected}},
        {"name": "other", "kind": "command", "command": step("other"), "metrics": {"nDCG@10": expected}},
    ]


def test_references_resolve_and_only_runs_what_a_row_consumes_first(workspace):
    path = write(workspace, chain())
    baselines = read_baselines(path)
    assert baselines.by_name["fused"].needs == ("model", "scored")
    assert baselines.by_name["scored"].needs == ("model",)
    resolved = resolve(baselines.by_name["fused"], baselines.by_name, Path("ROOT"))
    assert resolved.command[0].endswith("fused ${out}/run.trec ROOT/model/weights ROOT/scored/run.trec")
    assert reproduce(path, only=["fused"], out=workspace / "out") == 0
    assert calls(workspace) == ["model", "scored", "fused"]  # file order, consumed rows first; not "other"
    text = (workspace / "out" / "reproduce.md").read_text()
    assert "| fused | model, scored | measured |" in text and "| other | — | not run |" in text


def test_a_row_named_by_a_reference_key_resolves_to_its_main_output(workspace):
    rows = chain()
    rows[0]["command"] = [step("fused", "${out}/run.trec", "X")]
    rows[0]["run_file"] = "run.trec"
    rows.append({"name": "rerank", "kind": "rerank", "model": {"row": "model"}, "candidates": {"row": "scored"},
                 "metrics": {"nDCG@10": None}})
    baselines = read_baselines(write(workspace, rows))
    rerank = resolve(baselines.by_name["rerank"], baselines.by_name, Path("R"))
    assert (rerank.model, rerank.candidates) == ("R/model/weights", "R/scored/run.trec")
    assert baselines.by_name["rerank"].describe() == "scored top-100 re-ranked by model"


BAD = """\
data: {data}
rows:
  - name: first
    kind: command
    command: make first
    output: ${{out}}/x
  - name: second
    kind: rerank
    candidates: bm25
    model: {{row: {target}}}
    metrics: {{nDCG@10: 0.5}}
"""


@pytest.mark.parametrize("target, message", [
    ("nope", "baselines.yaml:10: row 'second': field 'model': no row named 'nope' (rows: first, second)"),
    ("first, output: model", "baselines.yaml:10: row 'second': field 'model': row 'first' (command) has no output "
                             "'model' (it has out, output)"),
])
def test_an_unknown_row_or_output_is_one_line_with_file_and_line(workspace, target, message):
    path = workspace / "baselines.yaml"
    path.write_text(BAD.format(data=workspace / "data", target=target))
    with pytest.raises(BaselineError) as err:
        read_baselines(path)
    assert str(err.value) == f"{workspace}/{message}"


def test_a_cycle_is_one_line_with_file_and_line(workspace, capsys):
    path = workspace / "baselines.yaml"
    path.write_text(f"data: {workspace / 'data'}\nrows:\n"
                    "  - name: a\n    kind: command\n    command: make a ${rows.b}\n"
                    "  - name: b\n    kind: command\n    command:\n      - make b\n      - make c ${rows.a.out}\n")
    with pytest.raises(BaselineError) as err:
        read_baselines(path)
    assert str(err.value) == f"{path}:10: row 'b': rows consume each other in a cycle: a -> b -> a"
    from research.cli.main import main

    assert main(["reproduce", str(path), "--dry-run"]) == 2
    assert capsys.readouterr().err == f"research: error: {err.value}\n"


def test_a_row_deletes_its_old_outputs_so_a_silent_command_cannot_be_scored_on_them(workspace):
    elsewhere = workspace / "runs" / "made-elsewhere"
    rows = [{"name": "silent", "kind": "command", "command": step("silent", "-"), "metrics": {"nDCG@10": 0.5}},
            {"name": "maker", "kind": "command", "command": step("maker", str(elsewhere / "f")),
             "output": str(elsewhere)}]
    path = write(workspace, rows)
    stale = workspace / "out" / "silent" / "run.trec"
    write_run(stale, RUN)
    (elsewhere).mkdir(parents=True)
    (elsewhere / "old").write_text("stale")
    assert reproduce(path, out=workspace / "out") == 1
    assert not stale.exists() and not (elsewhere / "old").exists() and (elsewhere / "f").exists()
    result = json.loads((workspace / "out" / "reproduce.json").read_text())["rows"]
    assert result["silent"]["status"] == "error" and "exited 0 without writing" in result["silent"]["message"]
    assert result["maker"]["status"] == "done"


def test_an_output_that_is_the_working_folder_is_never_deleted(workspace):
    path = write(workspace, [{"name": "bad", "kind": "command", "command": step("bad"), "output": "."},
                             {"name": "worse", "kind": "command", "command": step("worse"), "output": "out"}])
    for name in ("bad", "worse"):  # the working folder; the out root, which holds every row's folder
        with pytest.raises(BaselineError, match="refusing to delete"):
            reproduce(path, only=[name], out=workspace / "out")
    assert (workspace / "make.py").exists()


def test_a_consumer_of_a_failed_row_is_not_run(workspace):
    rows = chain(0.5)
    rows[1]["command"] = f"{sys.executable} -c 'raise SystemExit(3)'"
    assert reproduce(write(workspace, rows), only=["fused"], out=workspace / "out") == 1
    assert calls(workspace) == []
    text = (workspace / "out" / "reproduce.md").read_text()
    assert "`scored`: not run: it consumes model, which did not finish" in text
    assert "`fused`: not run: it consumes model, scored, which did not finish" in text


def test_a_score_row_scores_another_rows_run_without_running_anything(workspace):
    rows = chain()[1:3] + [{"name": "again", "kind": "score", "run": {"row": "scored", "output": "run"},
                            "metrics": {"nDCG@10": None}}]
    path = write(workspace, rows)
    assert read_baselines(path).by_name["again"].needs == ("scored",)
    assert reproduce(path, only=["again"], out=workspace / "out") == 0
    assert calls(workspace) == ["model", "scored"]  # the run file was made once, by its producer
    result = json.loads((workspace / "out" / "reproduce.json").read_text())["rows"]
    assert result["again"]["measured"] == result["scored"]["measured"]
    assert result["again"]["measured"]["nDCG@10"] > 0


def test_a_score_row_must_name_a_run_that_a_row_makes(workspace):
    path = write(workspace, [{"name": "outside", "kind": "score", "run": "runs/old/run.trec",
                              "metrics": {"nDCG@10": 0.5}}])
    with pytest.raises(BaselineError, match=r"baselines.yaml:6: row 'outside' \(score\): 'run' must "
                                            r"name another row's run file"):
        read_baselines(path)


def test_only_an_interpolating_rerank_offers_its_raw_run(workspace):
    rerank = {"name": "ce", "kind": "rerank", "model": "m", "candidates": "bm25", "metrics": {"nDCG@10": None}}
    score = {"name": "raw", "kind": "score", "run": "${rows.ce.raw}", "metrics": {"nDCG@10": None}}
    baselines = read_baselines(write(workspace, [{**rerank, "interpolate": 0.5}, score]))
    assert resolve(baselines.by_name["raw"], baselines.by_name, Path("R")).run == "R/ce/run.trec"
    assert baselines.by_name["ce"].run_path(Path("R/ce")) == Path("R/ce/interpolated/run.trec")
    with pytest.raises(BaselineError, match="row 'ce' \\(rerank\\) has no output 'raw'"):
        read_baselines(write(workspace, [rerank, score]))


def test_reuse_names_the_file_and_its_time_and_keeps_the_original_wall_time(workspace):
    path = write(workspace, chain(None)[1:])
    assert reproduce(path, out=workspace / "out") == 0
    first = json.loads((workspace / "out" / "reproduce.json").read_text())["rows"]["other"]
    assert first["origin"] == "ran" and first["seconds"] is not None
    run_file = workspace / "out" / "other" / "run.trec"
    os.utime(run_file, (time.time() - 86400, time.time() - 86400))
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(run_file.stat().st_mtime))
    assert reproduce(path, out=workspace / "out", reuse=True) == 0
    assert calls(workspace) == ["model", "scored", "other"]  # nothing ran the second time
    text = (workspace / "out" / "reproduce.md").read_text()
    assert f"reused `{run_file} (modified {stamp})`" in text
    assert "| other | — | measured | 0 s | reused" in text and "| measured (reused) |" in text


def test_a_row_without_expectation_is_measured_and_fails_under_strict(workspace):
    path = write(workspace, chain(None)[3:])
    assert reproduce(path, out=workspace / "out") == 0
    assert reproduce(path, out=workspace / "out", strict=True) == 1
    assert "| measured |" in (workspace / "out" / "reproduce.md").read_text()


def test_only_keeps_the_other_rows_last_results_beside_each_table(workspace):
    path = write(workspace, chain(0.5)[1:])
    table = workspace / "results" / "table.md"
    assert reproduce(path, out=workspace / "out", table=table) == 1  # 0.5 is not what the template scores
    before = json.loads(results_json(table).read_text())["rows"]
    assert reproduce(path, only=["other"], out=workspace / "out", table=table) == 1
    after = json.loads(results_json(table).read_text())["rows"]
    assert after["scored"] == before["scored"] and after["other"]["finished"] >= before["other"]["finished"]
    text = table.read_text()
    assert f"| scored | model | FAIL | {_duration(before['scored']['seconds'])} | kept from the previous table (ran " \
           f"{before['scored']['finished']}) |" in text
    assert "| FAIL (kept) |" in text and "skipped" not in text
    # a kept row whose commands changed since says so
    rows = chain(0.5)[1:]
    rows[1]["command"] = [step("scored", "${out}/run.trec", "${rows.model}", "extra")]
    reproduce(write(workspace, rows), only=["other"], out=workspace / "out", table=table)
    assert "the row's commands changed since" in table.read_text()


def _duration(seconds: float) -> str:
    from research.runs.reproduce.table import duration

    return duration(seconds)


def test_the_scifact_file_declares_what_every_row_consumes():
    baselines = read_baselines(Path(__file__).resolve().parents[1] / "experiments" / "baselines" / "scifact.yaml")
    rows = baselines.by_name
    assert rows["bm25-cross-encoder-interpolated"].needs == ("cross-encoder-stage1",)
    assert rows["bm25-cross-encoder"].needs == ("bm25-cross-encoder-interpolated",)  # one re-rank for both rows
    assert rows["cross-encoder-stage4"].needs == ("qrels-groups", "cross-encoder-stage3")
    assert rows["zelo-student"].needs == ("zelo-votes", "cross-encoder-stage1")
    assert set(rows["zelo-votes"].needs) == {"bi-encoder-finetuned", "cross-encoder-stage1"}
    assert rows["bi-encoder-dev"].needs == rows["cross-encoder-dev"].needs == ("scifact-dev",)
    assert rows["minilm-zero-shot-bf16"].batch_size == 128  # the main job's eval batch: the README's 0.6471
    assert rows["llm-layers"].needs == ("scifact-dev",)
    for row in baselines.rows:  # nothing is read from a folder that no row makes (a path that starts at runs/)
        text = " ".join(str(getattr(row, key)) for key in row.reference_fields)
        assert not re.search(r"(^|[\s'\"\[])runs/", text.replace("runs/data/scifact-dev", "")), row.name
