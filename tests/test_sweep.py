"""Sweeps: the sweep file, grid/random expansion, run ids, override files, W&B export and agent arguments, and the
local runner (resume after SIGKILL/SIGTERM, parallel workers, one sweep per folder), mostly with a stand-in for
``research fit`` (a tiny script); one test runs the real ``research fit`` on a tiny BERT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from research.runs import layout
from research.runs import sweep as sweep_mod
from research.runs.sweep import (
    SweepError,
    agent_run,
    config_label,
    configurations,
    expand_runs,
    load_sweep,
    override_config,
    parse_agent_args,
    parse_set,
    run_id,
    run_sweep,
    status_table,
    wandb_config,
)
from research.runs.sweep import runner as runner_mod

ROOT = Path(__file__).resolve().parents[1]

# A stand-in for `research fit`: reads the configs, "trains" (writes checkpoints/last.ckpt), writes eval_after/ and
# logs each execution (run dir, resumed checkpoint, pid) to $FAKE_FIT_LOG. With $FAKE_FIT_HANG set to a substring of
# the run dir, it writes its checkpoint and then sleeps (a run to kill mid-way).
FAKE_FIT = textwrap.dedent('''
    import json, os, sys, time
    from pathlib import Path
    import yaml
    args = sys.argv[2:]
    configs, opts = [], {}
    i = 0
    while i < len(args):
        if args[i] == "--config":
            configs.append(args[i + 1]); i += 2
        elif args[i].startswith("--") and "=" in args[i]:
            k, v = args[i][2:].split("=", 1); opts[k] = v; i += 1
        else:
            opts[args[i][2:]] = args[i + 1]; i += 2
    config = {}
    def merge(a, b):
        for k, v in b.items():
            a[k] = merge(a.get(k, {}), v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
        return a
    for c in configs:
        merge(config, yaml.safe_load(open(c)) or {})
    run_dir = Path(opts["run_dir"])
    with open(os.environ["FAKE_FIT_LOG"], "a") as log:
        log.write(json.dumps({"run": run_dir.name, "ckpt": opts.get("ckpt_path"), "pid": os.getpid()}) + "\\n")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    (run_dir / "checkpoints" / "last.ckpt").write_text("step 10")
    if os.environ.get("FAKE_FIT_HANG") and os.environ["FAKE_FIT_HANG"] in run_dir.name:
        (run_dir / "hanging.pid").write_text(str(os.getpid()))
        time.sleep(600)
    lr = float(config["model"]["init_args"].get("lr", 0.1))
    seed = config["seed_everything"]
    value = round(0.5 + lr + seed / 1000, 6)
    (run_dir / "eval_after").mkdir(exist_ok=True)
    (run_dir / "eval_after" / "metrics.json").write_text(json.dumps({"nDCG@10": value, "num_queries": 2}))
    (run_dir / "eval_after" / "per_query.json").write_text(json.dumps({"q1": {"nDCG@10": value}, "q2": {"nDCG@10": value}}))
''')


@pytest.fixture()
def fake_fit(tmp_path, monkeypatch):
    script = tmp_path / "fake_fit.py"
    script.write_text(FAKE_FIT)
    log = tmp_path / "executions.jsonl"
    monkeypatch.setattr(layout, "RESEARCH_PROGRAM", [sys.executable, str(script)])
    monkeypatch.setenv("FAKE_FIT_LOG", str(log))
    return script, log


def write_sweep(tmp_path: Path, **overrides) -> Path:
    base = tmp_path / "base.yaml"
    base.write_text("seed_everything: 0\nmodel:\n  init_args:\n    lr: 0.1\n")
    spec = {
        "name": "toy", "method": "grid", "metric": {"name": "test/nDCG@10", "goal": "maximize"},
        "parameters": {"model.init_args.lr": {"values": [0.01, 0.02]},
                       "model.init_args.loss.class_path": {"values": ["research.losses.InfoNCE"]},
                       "trainer.max_steps": {"value": 5}},
        "configs": [str(base)], "seeds": [1, 2], "seed_keys": ["seed_everything", "data.init_args.seed"],
    }
    spec.update(overrides)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def executions(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


# ---------------------------------------------------------------- the sweep file and its runs
def test_grid_expansion_is_seed_major_with_deterministic_ids(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path))
    runs = expand_runs(sweep)
    assert [(r.params["model.init_args.lr"], r.seed) for r in runs] == [(0.01, 1), (0.02, 1), (0.01, 2), (0.02, 2)]
    assert sweep.varying_keys == ("model.init_args.lr",)
    ids = [r.run_id for r in runs]
    assert ids == [r.run_id for r in expand_runs(load_sweep(write_sweep(tmp_path)))]  # deterministic
    assert len(set(ids)) == 4 and ids[0].startswith("0.01-s1-") and ids[2].startswith("0.01-s2-")
    assert run_id({"a": 1}, 1) != run_id({"a": 1}, 2) != run_id({"a": 2}, 2)
    assert config_label({"model.init_args.loss.class_path": "research.losses.TripletLoss"}) == "TripletLoss"
    assert config_label({"model.init_args.lr": 1e-5, "data.init_args.num_negatives": 2}) == "lr=1e-05 num_negatives=2"


def test_random_search_is_seeded_bounded_and_prefix_stable(tmp_path):
    params = {"model.init_args.lr": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-3},
              "model.init_args.temperature": {"distribution": "uniform", "min": 0.01, "max": 0.1},
              "data.init_args.num_negatives": {"distribution": "int_uniform", "min": 0, "max": 3},
              "model.init_args.loss.class_path": {"values": ["a.B", "a.C"], "probabilities": [0.5, 0.5]}}
    sweep = load_sweep(write_sweep(tmp_path, method="random", parameters=params, run_cap=8, random_seed=3))
    runs = expand_runs(sweep)
    assert len(runs) == 8 and len({r.run_id for r in runs}) == 8
    again = expand_runs(load_sweep(write_sweep(tmp_path, method="random", parameters=params, run_cap=8, random_seed=3)))
    assert [r.run_id for r in again] == [r.run_id for r in runs]
    for config in configurations(sweep):
        assert 1e-5 <= config["model.init_args.lr"] <= 1e-3
        assert 0.01 <= config["model.init_args.temperature"] <= 0.1
        assert config["data.init_args.num_negatives"] in (0, 1, 2, 3)
    longer = configurations(load_sweep(write_sweep(tmp_path, method="random", parameters=params, run_cap=12, random_seed=3)))
    assert longer[:4] == configurations(sweep)  # a larger run_cap keeps the runs already drawn
    with pytest.raises(SweepError, match="run_cap"):
        configurations(load_sweep(write_sweep(tmp_path, method="random", parameters=params)))
    with pytest.raises(SweepError, match="method: random"):
        configurations(load_sweep(write_sweep(tmp_path, parameters=params)))


def test_bayes_and_invalid_files_are_clear_errors(tmp_path):
    with pytest.raises(SweepError, match="wandb agent"):
        expand_runs(load_sweep(write_sweep(tmp_path, method="bayes")))
    with pytest.raises(SweepError, match="unknown key"):
        load_sweep(write_sweep(tmp_path, epochs=3))
    with pytest.raises(SweepError, match="method"):
        load_sweep(write_sweep(tmp_path, method="hyperband"))
    with pytest.raises(SweepError, match="base config"):
        load_sweep(write_sweep(tmp_path, configs=["missing.yaml"]))
    with pytest.raises(SweepError, match="seeds"):
        load_sweep(write_sweep(tmp_path, seeds=[1, 1]))
    with pytest.raises(SweepError, match="reserved"):
        load_sweep(write_sweep(tmp_path, parameters={"seed": {"values": [1, 2]}}))


def test_override_config_nests_dotted_keys_bundles_and_seeds():
    params = {"model.init_args.loss.class_path": "research.losses.InfoNCE", "trainer.max_steps": 25,
              "variant": {"data.init_args.num_negatives": 1, "model.init_args.temperature": 0.02}}
    tree = override_config(params, 7, ["seed_everything", "data.init_args.seed"])
    assert tree == {"model": {"init_args": {"loss": {"class_path": "research.losses.InfoNCE"}, "temperature": 0.02}},
                    "trainer": {"max_steps": 25}, "data": {"init_args": {"num_negatives": 1, "seed": 7}},
                    "seed_everything": 7}
    # a named bundle: the name labels the run and never reaches the config
    named = {"model.init_args.loss.class_path": {"name": "InfoNCE+HN", "model.init_args.loss.class_path": "research.losses.InfoNCE",
                                                 "data.init_args.num_negatives": 3}}
    assert override_config(named, None, []) == {"model": {"init_args": {"loss": {"class_path": "research.losses.InfoNCE"}}},
                                                "data": {"init_args": {"num_negatives": 3}}}
    assert config_label(named) == "InfoNCE+HN" and run_id(named, 1).startswith("InfoNCE+HN-s1-")


def test_wandb_export_and_agent_arguments(tmp_path, fake_fit):
    path = write_sweep(tmp_path)
    exported = wandb_config(load_sweep(path), path)
    assert not set(exported) & {"configs", "seeds", "seed_keys"}
    assert exported["parameters"]["seed"] == {"values": [1, 2]}
    assert exported["command"] == ["${env}", "research", "sweep-agent", str(path), "${args}"]
    assert parse_agent_args(["--model.init_args.lr=0.02", "--seed=2", "--flag", "--name", "x",
                             "--variant={'data.init_args.num_negatives': 1}"]) == {
        "model.init_args.lr": 0.02, "seed": 2, "flag": True, "name": "x", "variant": {"data.init_args.num_negatives": 1}}
    # what `wandb agent` runs: --key=value for every parameter (constants included), one run folder
    root = tmp_path / "runs"
    code = agent_run(path, ["--model.init_args.lr=0.02", "--model.init_args.loss.class_path=research.losses.InfoNCE",
                            "--trainer.max_steps=5", "--seed=2"], root=root)
    assert code == 0
    (run_dir,) = [p for p in (root / "toy").iterdir() if p.is_dir()]
    assert run_dir.name == run_id({"model.init_args.lr": 0.02, "model.init_args.loss.class_path": "research.losses.InfoNCE",
                                   "trainer.max_steps": 5}, 2, {"model.init_args.lr": 0.02})
    assert (run_dir / "FINISHED").is_file()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["init_args"]["seed"] == 2
    with pytest.raises(SweepError, match="not parameters"):
        agent_run(path, ["--model.init_args.dropout=0.1"], root=root)


def test_wandb_formatted_arguments_give_the_offline_run_ids():
    """The flags `wandb agent` builds for ${args} (wandb's own formatter) parse back to the offline run's values."""
    utils = pytest.importorskip("wandb.sdk.launch.sweeps.utils")
    sweep = load_sweep(ROOT / "experiments" / "sweeps" / "scifact_losses.yaml")
    for spec in expand_runs(sweep)[:4]:
        values = {**spec.params, "seed": spec.seed}
        flags = utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})["args"]
        parsed = parse_agent_args(flags)
        assert parsed == values
        seed = parsed.pop("seed")
        assert sweep_mod.RunSpec(parsed, seed, sweep.varying_keys).run_id == spec.run_id
    assert parse_agent_args(["--lr=1e-05", "--flag=True", "--none=None", "--precision=bf16-mixed"]) == {
        "lr": 1e-05, "flag": True, "none": None, "precision": "bf16-mixed"}


# ---------------------------------------------------------------- the runner
def test_runs_each_configuration_once_and_skips_finished(tmp_path, fake_fit):
    _, log = fake_fit
    path = write_sweep(tmp_path)
    root = tmp_path / "runs"
    result = run_sweep(path, root=root, quiet=True, max_runs=3)
    assert len(result.finished) == 3 and len(result.pending) == 1
    result = run_sweep(path, root=root, quiet=True)
    assert len(result.skipped) == 3 and len(result.finished) == 1 and not result.pending
    runs = [e["run"] for e in executions(log)]
    assert sorted(runs) == sorted(r.run_id for r in expand_runs(load_sweep(path)))  # four runs, each once
    state = json.loads((root / "toy" / "sweep_state.json").read_text())
    assert {v["status"] for v in state["runs"].values()} == {"finished"}
    assert all(v["attempts"] == 1 for v in state["runs"].values())
    run_dir = root / "toy" / runs[0]
    info = json.loads((run_dir / "sweep_run.json").read_text())
    assert info["swept"] == {"model.init_args.lr": 0.01} and info["seed"] == 1 and info["label"] == "0.01"
    assert yaml.safe_load((run_dir / "override.yaml").read_text())["seed_everything"] == 1
    assert [row["status"] for row in status_table(path, root=root)] == ["finished"] * 4


def test_set_constants_reach_every_run_and_their_ids(tmp_path, fake_fit):
    """research sweep --set KEY=VALUE: a constant another command made (e.g. a groups file), in each run's override;
    another value gives other run ids, so a finished run with the old value is never taken for the new one."""
    _, log = fake_fit
    path = write_sweep(tmp_path)
    root = tmp_path / "runs"
    constants = parse_set(["data.init_args.groups_file=runs/a.jsonl", "trainer.max_steps=7"])
    assert constants == {"data.init_args.groups_file": "runs/a.jsonl", "trainer.max_steps": 7}
    result = run_sweep(path, root=root, quiet=True, constants=constants)
    assert len(result.finished) == 4
    for rid in result.finished:
        override = yaml.safe_load((root / "toy" / rid / "override.yaml").read_text())
        assert override["data"]["init_args"]["groups_file"] == "runs/a.jsonl" and override["trainer"]["max_steps"] == 7
    assert json.loads((root / "toy" / "sweep_state.json").read_text())["constants"] == constants
    other = run_sweep(path, root=root, quiet=True, constants={**constants, "data.init_args.groups_file": "runs/b.jsonl"})
    assert len(other.finished) == 4 and not other.skipped and not set(other.finished) & set(result.finished)
    assert [row["status"] for row in status_table(path, root=root, constants=constants)] == ["finished"] * 4
    assert len(executions(log)) == 8
    with pytest.raises(SweepError, match="sweeps this parameter"):
        load_sweep(path, {"model.init_args.lr": 0.5})
    for bad in (["no-equals-sign"], ["=1"], ["a=1", "a=2"]):
        with pytest.raises(SweepError, match="--set"):
            parse_set(bad)


def test_parallel_workers_run_every_run_once(tmp_path, fake_fit):
    _, log = fake_fit
    path = write_sweep(tmp_path, seeds=[1, 2, 3])
    result = run_sweep(path, root=tmp_path / "runs", parallel=3, quiet=True)
    assert len(result.finished) == 6 and not result.failed
    runs = [e["run"] for e in executions(log)]
    assert len(runs) == len(set(runs)) == 6


def test_failed_run_is_reported_and_retried(tmp_path, fake_fit):
    path = write_sweep(tmp_path, parameters={"model.init_args.lr": {"values": ["not-a-number", 0.02]}}, seeds=[1])
    result = run_sweep(path, root=tmp_path / "runs", quiet=True)
    assert len(result.failed) == 1 and len(result.finished) == 1
    state = json.loads((tmp_path / "runs" / "toy" / "sweep_state.json").read_text())
    assert state["runs"][result.failed[0]]["status"] == "failed"
    result = run_sweep(path, root=tmp_path / "runs", quiet=True, retry_failed=False)
    assert not result.finished and not result.failed


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_sweep_resumes_without_running_anything_twice(tmp_path, fake_fit, sig):
    script, log = fake_fit
    path = write_sweep(tmp_path)
    root = tmp_path / "runs"
    runs = [r.run_id for r in expand_runs(load_sweep(path))]
    hang = runs[2]  # the third run hangs after its checkpoint: the sweep is killed while it runs
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import research.runs.sweep as s, research.runs.layout as l; "
            f"l.RESEARCH_PROGRAM = [sys.executable, {str(script)!r}]; s.run_sweep({str(path)!r}, root={str(root)!r})")
    env = {**os.environ, "FAKE_FIT_HANG": hang, "PYTHONPATH": str(ROOT)}
    sweep = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    pid_file = root / "toy" / hang / "hanging.pid"
    deadline = time.monotonic() + 60
    while not pid_file.is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pid_file.is_file(), "the third run never started"
    time.sleep(0.2)
    child = int(pid_file.read_text())
    sweep.send_signal(sig)
    sweep.wait(timeout=30)
    deadline = time.monotonic() + 10  # the run in flight dies with the sweep (no orphan left to finish it)
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)
    assert [e["run"] for e in executions(log)] == runs[:3]
    assert not (root / "toy" / hang / "FINISHED").exists()

    result = run_sweep(path, root=root, quiet=True)  # resume
    assert sorted(result.skipped) == sorted(runs[:2]) and sorted(result.finished) == sorted(runs[2:])
    done = executions(log)
    assert [e["run"] for e in done] == runs[:3] + runs[2:]  # only the killed run ran again
    assert done[3]["ckpt"] == str(root / "toy" / hang / "checkpoints" / "last.ckpt")  # from its last checkpoint
    assert [e["run"] for e in done if e["ckpt"] is None] == runs  # every run started from scratch once
    state = json.loads((root / "toy" / "sweep_state.json").read_text())
    assert state["runs"][hang]["attempts"] == 2
    assert all(state["runs"][r]["attempts"] == 1 for r in runs if r != hang)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (dead, not yet reaped by its parent) counts as dead
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_one_sweep_per_folder(tmp_path):
    with runner_mod._exclusive(tmp_path / "s"):
        with pytest.raises(SweepError, match="another"):
            with runner_mod._exclusive(tmp_path / "s"):
                pass


# ---------------------------------------------------------------- the real `research fit`
def test_real_fit_runs_through_the_sweep(tmp_path, monkeypatch):
    from helpers import make_tiny_beir, make_tiny_model_dir

    model = make_tiny_model_dir(tmp_path / "model")
    data = make_tiny_beir(tmp_path / "data")
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({
        "seed_everything": 0, "test_after_fit": True, "save_model": False,
        "trainer": {"max_steps": 2, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                    "enable_model_summary": False, "limit_val_batches": 0, "num_sanity_val_steps": 0,
                    "log_every_n_steps": 1},
        "model": {"class_path": "modules.BiEncoderModule",
                  "init_args": {"model": str(model), "pooling": "mean", "query_max_length": 16, "document_max_length": 24,
                                "loss": {"class_path": "research.losses.InfoNCE"}}},
        "data": {"class_path": "datamodules.RetrievalDataModule",
                 "init_args": {"data": str(data), "batch_size": 4, "eval_batch_size": 64}}}))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "method": "grid",
        "parameters": {"model.init_args.loss.class_path": {"value": "research.losses.SymmetricInfoNCE"}},
        "configs": [str(base)], "seeds": [3], "seed_keys": ["seed_everything", "data.init_args.seed"],
        "keep_checkpoints": False}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    result = run_sweep(path, root=tmp_path / "runs", quiet=True)
    (rid,) = result.finished
    run_dir = tmp_path / "runs" / "tiny" / rid
    log = (run_dir / "stdout.log").read_text()
    assert (run_dir / "FINISHED").is_file(), log[-3000:]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["init_args"]["loss"]["class_path"] == "research.losses.SymmetricInfoNCE"
    assert config["seed_everything"] == 3 and config["data"]["init_args"]["seed"] == 3
    metrics = json.loads((run_dir / "eval_after" / "metrics.json").read_text())
    assert 0.0 <= metrics["nDCG@10"] <= 1.0
    assert not (run_dir / "checkpoints").exists()  # keep_checkpoints: false
    assert any((run_dir / "wandb").glob("offline-run-*"))
