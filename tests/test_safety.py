"""Safe loading and no secrets on disk.

* every ``torch.load`` in the framework is ``weights_only=True``; a crafted checkpoint runs no code (ours, Lightning's);
* a model folder that ships its own code (``auto_map``) is not executed unless ``trust_remote_code`` is turned on;
* a fake W&B key (environment) and a fake judge token (config and command line) appear nowhere in a run directory:
  not in config.yaml, run_info.json, hparams, checkpoints, metrics, nor the W&B offline run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from modules.bi_encoder import BiEncoderModule
from research.cli.main import main
from research.models.bi_encoder import BiEncoder
from research.safety import (
    REDACTED,
    find_secrets,
    is_secret_key,
    redact,
    redact_argv,
    redact_text,
    secret_env_values,
)
from research.training.callbacks import AtomicCheckpointIO

REPO = Path(__file__).resolve().parents[1]
FAKE_WANDB_KEY = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c"  # 40 hex characters, like a real key
FAKE_JUDGE_TOKEN = "judge-token-c0ffee-5ecret-123456"
FAKE_ARGV_TOKEN = "sk-argvtokenargvtokenargvtoken42"


# ------------------------------------------------------------------ redaction helpers
def test_secret_names():
    for name in ("api_key", "OPENAI_API_KEY", "WANDB_API_KEY", "hf_token", "judge.authToken", "password", "client_secret",
                 "Authorization", "access_key", "private_key", "credentials", "token"):
        assert is_secret_key(name), name
    for name in ("max_tokens", "tokenizer", "keyword", "key_field", "monkey", "batch_size",
                 "author", "passage", "query_max_length"):
        assert not is_secret_key(name), name


def test_redact_nested_configs_argv_and_environment(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_WANDB_KEY)
    monkeypatch.setenv("WANDB_MODE", "offline")  # short, not secret-named: never redacted
    assert secret_env_values() == [FAKE_WANDB_KEY] or FAKE_WANDB_KEY in secret_env_values()
    config = {"judge": {"api_key": FAKE_JUDGE_TOKEN, "max_tokens": 512, "token_budget": 10, "endpoint": "http://x"},
              "headers": [{"Authorization": f"Bearer {FAKE_JUDGE_TOKEN}"}], "note": f"key={FAKE_WANDB_KEY}",
              "hub": "hf_abcdefghijklmnopqrstuvwxyz0123", "tokenizer": "bert", "password": ""}
    redacted = redact(config)
    assert redacted == {"judge": {"api_key": REDACTED, "max_tokens": 512, "token_budget": 10, "endpoint": "http://x"},
                        "headers": [{"Authorization": REDACTED}], "note": f"key={REDACTED}", "hub": REDACTED,
                        "tokenizer": "bert", "password": ""}
    assert config["judge"]["api_key"] == FAKE_JUDGE_TOKEN  # a copy
    assert find_secrets(config) == ["judge.api_key", "headers[0].Authorization"]
    assert redact_argv(["fit", "--model.init_args.api_key", "abc", "--judge.token=xyz", "--trainer.max_epochs", "3",
                        f"--note={FAKE_WANDB_KEY}", FAKE_ARGV_TOKEN]) == \
        ["fit", "--model.init_args.api_key", REDACTED, f"--judge.token={REDACTED}", "--trainer.max_epochs", "3",
         f"--note={REDACTED}", REDACTED]
    assert redact_text(f"Authorization: Bearer {FAKE_WANDB_KEY}") == f"Authorization: Bearer {REDACTED}"


# ------------------------------------------------------------------ no secrets in a run directory
class JudgedBiEncoder(BiEncoderModule):
    """A module with a judge token among its init args (what the docs tell you not to do): it must not leak."""

    def __init__(self, judge_api_key: str | None = None, **kwargs) -> None:
        super().__init__(**kwargs)


CONFIG = """\
seed_everything: 3
test_after_fit: true
checkpoint_every_n_steps: 2
trainer:
  max_steps: 3
  accelerator: cpu
  devices: 1
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  limit_val_batches: 0
  log_every_n_steps: 1
model:
  class_path: test_safety.JudgedBiEncoder
  init_args:
    judge_api_key: {token}
    model: {model}
data:
  class_path: datamodules.RetrievalDataModule
  init_args:
    data: {data}
    batch_size: 4
"""


def _files_containing(root: Path, needle: str) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and needle.encode() in path.read_bytes():
            found.append(str(path.relative_to(root)))
    return found


@pytest.mark.parametrize("wandb_mode", ["offline", "disabled"])
def test_no_secret_reaches_the_run_directory(tiny_model_dir, tiny_beir_dir, tmp_path, monkeypatch, capsys, wandb_mode):
    monkeypatch.setenv("WANDB_MODE", wandb_mode)
    monkeypatch.setenv("WANDB_API_KEY", FAKE_WANDB_KEY)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "judged.yaml"
    config.write_text(CONFIG.format(token=FAKE_JUDGE_TOKEN, model=tiny_model_dir, data=tiny_beir_dir))
    run_dir = tmp_path / "run"
    argv = ["fit", "--config", str(config), "--run_dir", str(run_dir), f"--model.init_args.judge_api_key={FAKE_ARGV_TOKEN}"]
    monkeypatch.setattr(sys, "argv", ["research", *argv])
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "research: warning: --model.init_args.judge_api_key on the command line" in err
    assert "model.init_args.judge_api_key look like secrets: written as *** in config.yaml" in err

    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["init_args"]["judge_api_key"] == REDACTED
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["argv"][-1] == f"--model.init_args.judge_api_key={REDACTED}"
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["judge_api_key"] == REDACTED
    leaks = {secret: _files_containing(run_dir, secret) for secret in (FAKE_WANDB_KEY, FAKE_JUDGE_TOKEN, FAKE_ARGV_TOKEN)}
    if wandb_mode == "offline":
        assert list(run_dir.glob("wandb/offline-run-*")), "no W&B offline run was written"
        # W&B records the process command line in its run metadata: the reason for the warning above
        leaks[FAKE_ARGV_TOKEN] = [f for f in leaks[FAKE_ARGV_TOKEN] if not re.search(r"wandb/.*\.wandb$", f)]
    else:
        assert "judge_api_key: '***'" in (run_dir / "hparams.yaml").read_text()
    assert leaks == {secret: [] for secret in leaks}


# ------------------------------------------------------------------ safe loading
def _source_files() -> list[Path]:
    return [p for folder in ("research", "modules", "datamodules") for p in (REPO / folder).rglob("*.py")]


def test_every_torch_load_is_weights_only_and_no_pickle():
    offenders = []
    for path in _source_files():
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"torch\.load\(", text):
            call = text[match.start():text.find(")", match.start()) + 1]
            if "weights_only=True" not in call:
                offenders.append(f"{path.relative_to(REPO)}: {call}")
        for line in text.splitlines():
            if re.match(r"\s*(import pickle|from pickle|import dill|import cloudpickle)", line) or "pickle.load" in line:
                offenders.append(f"{path.relative_to(REPO)}: {line.strip()}")
            if re.search(r"trust_remote_code\s*=\s*True", line):
                offenders.append(f"{path.relative_to(REPO)}: {line.strip()} (trust_remote_code must come from a config)")
    assert offenders == []


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_crafted_checkpoint_runs_no_code(tmp_path):
    from lightning.fabric.utilities.cloud_io import _load as lightning_load

    marker = tmp_path / "EXECUTED"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "payload": _RunsCode(marker)}, path)
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        AtomicCheckpointIO().load_checkpoint(path)  # what `research fit --ckpt_path` loads with
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        lightning_load(path)  # Lightning's own default (weights_only=None) under torch >= 2.6 is weights-only too
    assert not marker.exists()
    plain = tmp_path / "plain.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {"lr": 0.1}}, plain)
    assert AtomicCheckpointIO().load_checkpoint(plain)["hyper_parameters"] == {"lr": 0.1}


def _custom_code_model(directory: Path, source: Path, model_type: str, marker: Path) -> Path:
    shutil.copytree(source, directory)
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel",
                          "AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (directory / "config.json").write_text(json.dumps(config))
    code = f"from pathlib import Path\nPath({str(marker)!r}).write_text('custom code ran')\n"
    for name in ("configuration_evil.py", "modeling_evil.py", "tokenization_evil.py"):
        (directory / name).write_text(code)
    return directory


def test_custom_model_code_is_not_executed_by_default(tiny_model_dir, tiny_beir_dir, tmp_path, capsys):
    marker = tmp_path / "EXECUTED"
    known = _custom_code_model(tmp_path / "bert_with_auto_map", tiny_model_dir, "bert", marker)
    encoder = BiEncoder.from_pretrained(known)  # a known architecture: the built-in class, the auto_map ignored
    assert type(encoder.query_encoder).__module__.startswith("transformers.models.bert")
    unknown = _custom_code_model(tmp_path / "custom_arch", tiny_model_dir, "evil_arch", marker)
    assert main(["evaluate", "--model", str(unknown), "--data", str(tiny_beir_dir), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("research: error: The repository ")
    assert "contains custom code" in err and "trust_remote_code: true" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_subprocess_refusal_is_one_line(tiny_model_dir, tiny_beir_dir, tmp_path):
    marker = tmp_path / "EXECUTED"
    unknown = _custom_code_model(tmp_path / "custom_arch", tiny_model_dir, "evil_arch", marker)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore",
           "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([str(Path(sys.executable).with_name("research")), "evaluate", "--model", str(unknown),
                             "--data", str(tiny_beir_dir), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not marker.exists()
