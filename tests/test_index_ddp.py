"""N ranks, one result: 2 CPU ranks (gloo) write the same shards as 1 and give the same metrics, each rank encoding
only its share of the corpus: ``research index --devices 2``, ``research evaluate --devices 2`` (the bi-encoder
module's test under DDP) and validation inside a 2-process DDP fit (the corpus encoded through the DDP wrapper, with
ranks holding unequal numbers of batches).

This file is also the fit worker: ``torchrun --nproc-per-node 2 tests/test_index_ddp.py OUT SPEC_JSON``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from research.cli.main import main
from research.retrieval.index.shards import shard_paths

REPO = Path(__file__).resolve().parents[1]
RESEARCH = Path(sys.executable).with_name("research")


def _env(tmp: Path, cache: str = "cache") -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
            "RESEARCH_CACHE_DIR": str(tmp / cache),
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _run(tmp: Path, *args: str, cache: str = "cache") -> subprocess.CompletedProcess:
    done = subprocess.run([str(RESEARCH), *args], env=_env(tmp, cache), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def _per_rank(stderr: str, label: str) -> dict[int, int]:
    """Texts each rank encoded, from the progress lines ``<label> (rank R): N texts``."""
    return {int(r): int(n.replace(",", "")) for r, n in re.findall(rf"{re.escape(label)} \(rank (\d)\): ([\d,]+) texts", stderr)}


def test_two_rank_index_writes_the_one_rank_shards(tiny_model_dir, tiny_beir_dir, tmp_path):
    common = ["--model", str(tiny_model_dir), "--data", str(tiny_beir_dir), "--accelerator", "cpu",
              "--shard-size", "5", "--batch-size", "3"]
    assert main(["index", *common, "--out", str(tmp_path / "one")]) == 0
    done = _run(tmp_path, "index", *common, "--out", str(tmp_path / "two"), "--devices", "2")
    assert _per_rank(done.stderr, "encoding shards") == {0: 20, 1: 16}  # shards 0,2,4,6 and 1,3,5,7 (the last: 1)
    for shard in range(8):
        for ours, theirs in zip(shard_paths(tmp_path / "two", shard), shard_paths(tmp_path / "one", shard)):
            assert ours.read_bytes() == theirs.read_bytes(), ours


def test_two_rank_evaluate_gives_the_one_rank_metrics(tiny_model_dir, tiny_beir_dir, tmp_path):
    common = ["evaluate", "--model", str(tiny_model_dir), "--data", str(tiny_beir_dir), "--batch-size", "2"]
    one = _run(tmp_path, *common, "--out", str(tmp_path / "one"), cache="cache-one")
    two = _run(tmp_path, *common, "--out", str(tmp_path / "two"), "--devices", "2", cache="cache-two")
    assert "encoding corpus: 36 texts" in one.stderr
    counts = _per_rank(two.stderr, "encoding corpus shards")
    assert counts == {0: 20, 1: 16}, two.stderr[-3000:]
    assert (tmp_path / "one" / "per_query.json").read_text() == (tmp_path / "two" / "per_query.json").read_text()
    metrics = [json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("one", "two")]
    assert all(metrics[0][k] == metrics[1][k] for k in ("nDCG@10", "RR@10", "R@100", "AP@100"))
    assert (tmp_path / "one" / "run.trec").read_text() == (tmp_path / "two" / "run.trec").read_text()
    # the shards do not depend on the rank count: 2 ranks find the 1-rank run's cache entry complete
    again = _run(tmp_path, *common, "--out", str(tmp_path / "again"), "--devices", "2", cache="cache-one")
    assert "encoding corpus" not in again.stderr, again.stderr[-3000:]  # every shard cached: no rank encodes
    assert (tmp_path / "again" / "run.trec").read_text() == (tmp_path / "one" / "run.trec").read_text()


# ------------------------------------------------------------------ validation inside a DDP fit (torchrun worker)
def _fit(model_dir: str, data_dir: str, devices: int, strategy):
    import lightning as L

    from datamodules.retrieval import RetrievalDataModule
    from modules.bi_encoder import BiEncoderModule

    module = BiEncoderModule(model=model_dir, lr=0.0, cache_corpus_embeddings=False)  # lr 0: weights stay the same
    data = RetrievalDataModule(data_dir, train_split="train", eval_split=None, val_split="test", batch_size=4,
                               eval_batch_size=2)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_epochs=1, limit_train_batches=1,
                        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(module, datamodule=data)
    return trainer, module.last_evaluation.metrics.aggregate


def worker(out: Path, spec: dict) -> None:
    import torch
    import torch.distributed as dist
    from lightning.pytorch.strategies import DDPStrategy

    from research.training.distributed import close_process_group

    torch.set_num_threads(1)
    trainer, metrics = _fit(spec["model_dir"], spec["data_dir"], 2, DDPStrategy(process_group_backend="gloo"))
    every: list = [None] * 2
    dist.all_gather_object(every, metrics)
    if trainer.global_rank == 0:
        (out / "fit.json").write_text(json.dumps(every))
    close_process_group()  # as the research CLI does: a gloo group left to interpreter exit can abort a rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_validation_inside_a_ddp_fit_equals_one_process(tiny_model_dir, tiny_beir_dir, tmp_path):
    spec = json.dumps({"model_dir": str(tiny_model_dir), "data_dir": str(tiny_beir_dir)})
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
               "--master-addr=127.0.0.1", f"--master-port={_free_port()}", __file__, str(tmp_path), spec]
    done = subprocess.run(command, env=_env(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    # 8 shards of 5 (the last 1) in batches of 2: rank 0 holds 12 batches, rank 1 10 (padded to 12 forwards)
    assert _per_rank(done.stderr, "encoding corpus shards") == {0: 20, 1: 16}
    two = json.loads((tmp_path / "fit.json").read_text())
    _, one = _fit(str(tiny_model_dir), str(tiny_beir_dir), 1, "auto")
    assert two[0] == two[1] == one


if __name__ == "__main__":
    worker(Path(sys.argv[1]), json.loads(sys.argv[2]))
