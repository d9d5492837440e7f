"""A newcomer's first hour, errors that help: every CLI error one line with exit code 2 (choices listed, no
traceback), no prefix matching and the nearest flag suggested, YAML key errors that keep their ``init_args`` path,
sweeps checked before their first run, and messages about a missing model, dataset or report folder that say what
is there instead of showing internals."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from research.cli.main import build_parser, main
from research.errors import ResearchError

FIT_YAML = """\
seed_everything: 1
trainer:
  max_steps: 1
  accelerator: cpu
  devices: 1
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
model:
  class_path: modules.BiEncoderModule
  init_args:
    model: {model}
    lr: 1.0e-3
data:
  class_path: datamodules.RetrievalDataModule
  init_args:
    data: {data}
    eval_split: null
    batch_size: 4
"""


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("research: error: "), err
    return lines[0]


# ------------------------------------------------------------------ argparse commands
def test_bad_choice_is_one_line_listing_the_choices(tiny_model_dir, tiny_beir_dir, tmp_path, capsys):
    code = main(["evaluate", "--model", str(tiny_model_dir), "--data", str(tiny_beir_dir), "--out", str(tmp_path / "o"),
                 "--precision", "bf16x"])
    assert code == 2
    line = _one_line(capsys)
    assert "argument --precision: invalid choice: 'bf16x' (choose from 32-true, bf16-mixed)" in line
    assert "did you mean bf16-mixed?" in line and "Traceback" not in line
    assert not (tmp_path / "o").exists()


def test_no_prefix_matching_and_the_nearest_flag(tiny_beir_dir, tmp_path, capsys):
    base = ["bm25", "--data", str(tiny_beir_dir), "--out", str(tmp_path / "o")]
    assert main([*base, "--topk", "10"]) == 2
    assert _one_line(capsys) == ("research: error: bm25: unrecognized arguments: --topk 10 (did you mean --top-k?) "
                                 "(research bm25 --help)")
    assert main([*base, "--top", "10"]) == 2  # a prefix of --top-k is not --top-k
    assert "unrecognized arguments: --top 10" in _one_line(capsys)
    assert main(["zelo", "votes", "--data", "x", "--out", "y", "--top-m", "3"]) == 2
    assert "zelo votes: unrecognized arguments: --top-m 3 (did you mean --top-n?)" in _one_line(capsys)
    assert main(["bm52"]) == 2
    assert "(did you mean bm25?)" in _one_line(capsys)


def test_lightning_flags_are_not_prefix_matched(tiny_model_dir, tiny_beir_dir, tmp_path, capsys):
    config = tmp_path / "fit.yaml"
    config.write_text(FIT_YAML.format(model=tiny_model_dir, data=tiny_beir_dir))
    assert main(["fit", "--config", str(config), "--run_dir", str(tmp_path / "r"), "--trainer.max_step", "2"]) == 2
    assert _one_line(capsys) == ("research: error: unrecognized arguments: --trainer.max_step 2 "
                                 "(did you mean --trainer.max_steps?)")
    assert main(["fit", "--config", str(config), "--run_dir", str(tmp_path / "r"), "--model.init_args.lr_x", "2"]) == 2
    assert _one_line(capsys).endswith("--model.init_args.lr_x: is not an accepted option "
                                      "(did you mean --model.init_args.lr?)")
    assert not (tmp_path / "r").exists()


def test_yaml_key_error_keeps_its_init_args_path(tiny_model_dir, tiny_beir_dir, tmp_path, capsys):
    config = tmp_path / "fit.yaml"
    text = FIT_YAML.format(model=tiny_model_dir, data=tiny_beir_dir)
    config.write_text(text.replace("    lr: 1.0e-3\n", "    lr: 1.0e-3\n    temprature: 0.1\n"))
    assert main(["fit", "--config", str(config), "--run_dir", str(tmp_path / "r")]) == 2
    assert _one_line(capsys) == (f"research: error: {config}:14: field 'model.init_args.temprature' is not an "
                                 "accepted option (did you mean temperature?)")
    config.write_text(text.replace("    lr: 1.0e-3\n", "    lr: 1.0e-3\n    los:\n      class_path: x\n"))
    assert main(["fit", "--config", str(config), "--run_dir", str(tmp_path / "r")]) == 2
    assert _one_line(capsys).endswith(f"{config}:15: field 'model.init_args.los.class_path' is not an accepted option "
                                      "(did you mean loss?)")


def test_every_option_says_its_default_in_help():
    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    if sub.add_help:  # the Lightning commands have their own --help
                        yield from walk(sub, f"{path} {name}")
            elif action.option_strings and not isinstance(action, argparse._HelpAction):
                yield path, action, parser

    missing = []
    for path, action, parser in walk(build_parser(), "research"):
        text = parser._get_formatter()._expand_help(action) if action.help else ""
        if not text or (not action.required and "default" not in text.lower()):
            missing.append(f"{path} {action.option_strings[0]}")
    assert not missing, missing


# ------------------------------------------------------------------ sweeps
SWEEP = """\
name: typo
method: grid
parameters:
  model.init_args.los.class_path:
    values: [research.losses.InfoNCE]
configs: [{base}]
seeds: [1, 2]
"""


def test_a_sweep_with_a_bad_key_fails_before_its_first_run(tiny_model_dir, tiny_beir_dir, tmp_path, capsys,
                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = tmp_path / "base.yaml"
    base.write_text(FIT_YAML.format(model=tiny_model_dir, data=tiny_beir_dir))
    sweep = tmp_path / "typo.yaml"
    sweep.write_text(SWEEP.format(base=base))
    root = tmp_path / "sweeps"
    assert main(["sweep", str(sweep), "--root", str(root), "--status"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[:4:2]] == ["invalid", "invalid"], out
    assert "reason: override.yaml:" in out[1] and "'model.init_args.los.class_path' is not an accepted option" in out[1]
    assert out[-1] == "0/2 finished, 2 invalid (fix the sweep file: they would fail at the start)"
    assert main(["sweep", str(sweep), "--root", str(root)]) == 2
    line = _one_line(capsys)
    assert line.startswith(f"research: error: {sweep}:4: parameter 'model.init_args.los.class_path': run ")
    assert "and 1 more run(s) would fail at the start, so nothing was run" in line and "(did you mean loss?)" in line
    assert not [p for p in root.rglob("*") if p.name in ("stdout.log", "override.yaml")]


def test_a_failed_sweep_run_says_why_in_the_sweep_output(tmp_path, monkeypatch, capsys):
    from research.runs import layout
    from research.runs.sweep import run_sweep, status_table

    fake = tmp_path / "fake_fit.py"
    fake.write_text("import sys\nprint('loading...')\nprint('research: error: data.yaml:3: field \\'x\\' boom', "
                    "file=sys.stderr)\nsys.exit(2)\n")
    monkeypatch.setattr(layout, "RESEARCH_PROGRAM", [sys.executable, str(fake)])
    (tmp_path / "base.yaml").write_text("trainer: {}\n")
    sweep = tmp_path / "s.yaml"
    sweep.write_text("name: s\nmethod: grid\nparameters:\n  model.init_args.lr:\n    values: [0.1]\n"
                     f"configs: [{tmp_path / 'base.yaml'}]\n")
    result = run_sweep(sweep, root=tmp_path / "sweeps")
    assert result.failed and not result.finished
    out = capsys.readouterr().out
    assert "(return code 2: data.yaml:3: field 'x' boom; log: " in out, out
    (row,) = status_table(sweep, root=tmp_path / "sweeps")
    assert row["status"] == "failed" and row["reason"] == "data.yaml:3: field 'x' boom"


# ------------------------------------------------------------------ what is not there
def test_a_missing_model_path_says_so_without_hub_internals(tmp_path):
    from research.models.pretrained import resolve_model

    with pytest.raises(ResearchError) as info:
        resolve_model(tmp_path / "no_such_model")
    message = str(info.value)
    assert message.startswith(f"no model folder or known name '{tmp_path / 'no_such_model'}': ")
    assert "does not exist" in message and "all-MiniLM-L6-v2" in message
    assert "HFValidationError" not in message and "Repo id" not in message and "repo_name" not in message
    (tmp_path / "file").write_text("x")
    with pytest.raises(ResearchError, match="is a file, not a model folder"):
        resolve_model(tmp_path / "file")


def test_a_misspelled_dataset_fails_fast_listing_what_is_there(tmp_path, tiny_beir_dir):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(tiny_beir_dir, root / "scifact")
    (root / "nfcorpus").mkdir()
    env = {"RESEARCH_DATA_DIR": str(root), "HF_HUB_OFFLINE": "1"}
    code = ("import sys\nfrom research.cli.main import main\n"
            f"rc = main(['evaluate', '--model', 'm', '--data', 'scifactt', '--out', {str(tmp_path / 'o')!r}])\n"
            "print(rc, 'torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, **env})
    assert result.stdout.split() == ["2", "False"], result.stderr  # failed before loading torch and the model
    assert result.stderr.strip() == (
        f"research: error: dataset 'scifactt' not found: not a folder, and not under the data root {root} (which "
        "holds nfcorpus, scifact); did you mean 'scifact'? (set RESEARCH_DATA_DIR; BEIR names download automatically "
        "when online)")


def test_report_of_a_missing_folder_names_it_once(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "sweeps" / "scifact-losses").mkdir(parents=True)
    assert main(["report", "runs/nowhere"]) == 2
    assert _one_line(capsys) == "research: error: no runs found: runs/nowhere: no such folder"
    assert main(["report", "scifact-loses"]) == 2
    line = _one_line(capsys)
    assert line.endswith("(looked in runs/sweeps/ and runs/); did you mean 'scifact-losses'?") and line.count("loses") == 1


def test_sweep_runs_replace_their_own_unfinished_attempts():
    from research.runs.sweep import fit_command

    command = fit_command(["a.yaml"], Path("o.yaml"), Path("d"), "n")
    assert command[command.index("--overwrite") + 1] == "true"
