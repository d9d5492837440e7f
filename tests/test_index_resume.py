"""A ``research index`` killed mid-way (SIGKILL, in the middle of a shard) and resumed writes the same shards, byte
for byte, as an uninterrupted one; the rerun encodes only the shards the killed one did not finish.

This file is also the worker: ``python tests/test_index_resume.py BATCHES ARGS...`` runs ``research ARGS`` and kills
itself with SIGKILL once ``BATCHES`` predicted batches have been written, as a crash or a pre-empted job would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from research.cli.main import main
from research.retrieval.index.manifest import read_manifest
from research.retrieval.index.shards import missing_shards, shard_paths

REPO = Path(__file__).resolve().parents[1]


def _args(model: Path, data: Path, out: Path) -> list[str]:
    return ["index", "--model", str(model), "--data", str(data), "--out", str(out), "--accelerator", "cpu",
            "--shard-size", "5", "--batch-size", "2"]


def test_killed_index_resumes_to_the_same_shards(tiny_model_dir, tiny_beir_dir, tmp_path, capsys):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert main(_args(tiny_model_dir, tiny_beir_dir, reference)) == 0
    manifest = read_manifest(reference)
    assert manifest.num_shards == 8  # 36 documents, 5 a shard: 3 batches of 2 a shard, the last shard 1 batch
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, __file__, "7", *_args(tiny_model_dir, tiny_beir_dir, killed)], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert missing_shards(killed, manifest) == [2, 3, 4, 5, 6, 7]  # shard 2 had one of its batches in memory
    assert not shard_paths(killed, 2)[0].exists()
    capsys.readouterr()
    assert main(_args(tiny_model_dir, tiny_beir_dir, killed)) == 0
    assert "(6 encoded now, 2 already there" in capsys.readouterr().out
    for shard in range(manifest.num_shards):
        for ours, theirs in zip(shard_paths(killed, shard), shard_paths(reference, shard)):
            assert ours.read_bytes() == theirs.read_bytes(), ours
    assert sorted(p.name for p in (killed / "shards").iterdir()) == sorted(p.name for p in (reference / "shards").iterdir())
    assert json.loads((killed / "manifest.json").read_text()) == json.loads((reference / "manifest.json").read_text())


def _worker(batches: int, argv: list[str]) -> None:
    from research.training.index_writer import ShardWriter

    original = ShardWriter.write_on_batch_end
    seen = []

    def write_then_die(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen.append(1)
        if len(seen) == batches:
            os.kill(os.getpid(), signal.SIGKILL)

    ShardWriter.write_on_batch_end = write_then_die
    sys.exit(main(argv))


if __name__ == "__main__":
    _worker(int(sys.argv[1]), sys.argv[2:])
