"""BiEncoderModule under Lightning DDP on CPU: 2 processes (torchrun, gloo, loopback only) equal one process.

A tiny random BERT (dropout off) trains one step with SGD(lr=1) on a dataset of exactly one global batch (8 queries,
1 positive + 1 hard negative each; every hard negative is another query's positive, so the false-negative mask has
entries that cross ranks). The single process takes the 8 queries as one batch; each of the 2 ranks takes 4 of them.
With ``gather_across_devices`` the global mean loss and the parameters after the step (= minus the gradients) equal
the single process to 1e-5, also with GradCache chunking; without the gather they differ.

This file is also the worker script: ``torchrun --nproc-per-node 2 tests/test_lightning_ddp.py OUT SPEC_JSON``
(tests/test_strategies.py launches it for the fully_shard strategy).
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

WORLD, LOCAL_BATCH = 2, 4
QUERIES = WORLD * LOCAL_BATCH  # the dataset is exactly one global batch: rank r's batch is half r of the single one
TOLERANCE = 1e-5
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(40)]
TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
MODULE_DEFAULTS = dict(temperature=0.1, learn_temperature=True, query_max_length=16, document_max_length=24)
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ tiny model and data (built from scratch)
def make_model_dir(directory: Path) -> Path:
    """A randomly initialised 2-layer BERT (hidden 32, no dropout) and a 45-token WordPiece vocabulary."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizerFast(vocab_file=str(directory / "vocab.txt"), do_lower_case=True).save_pretrained(directory)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(VOCAB), **TINY_BERT)).save_pretrained(directory)
    return directory


def make_data_dir(directory: Path) -> Path:
    """BEIR folder: 8 train queries (q_i relevant: d_i), 16 documents, test qrels, and a groups file whose hard
    negative for q_i is d_(i+1 mod 8), the positive of q_(i+1): any split of the 8 queries over 2 ranks puts some
    copy of a query's positive on the other rank, where the mask must still find it."""
    rng = random.Random(0)
    words = [w for w in VOCAB if w.startswith("w")]

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    directory.mkdir(parents=True, exist_ok=True)
    docs = [{"_id": f"d{i}", "title": text(2), "text": text(4 + i % 9)} for i in range(16)]
    queries = [{"_id": f"q{i}", "text": text(3 + i % 4)} for i in range(QUERIES)]
    (directory / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (directory / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (directory / "qrels").mkdir(exist_ok=True)
    (directory / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(QUERIES)))
    (directory / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\nq{i}\td{8 + i}\t1\n" for i in range(QUERIES)))
    groups = [{"query_id": f"q{i}", "positives": [f"d{i}"], "negatives": [f"d{(i + 1) % QUERIES}"]} for i in range(QUERIES)]
    (directory / "groups.jsonl").write_text("".join(json.dumps(g) + "\n" for g in groups))
    return directory


def make_module(model_dir: Path, sync_every_chunk: bool = False, **kwargs):
    """A BiEncoderModule with plain SGD(lr=1): parameters after one step are the start minus the gradients."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    from modules.bi_encoder import BiEncoderModule

    class SGDModule(BiEncoderModule):
        def configure_optimizers(self):
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=1.0)

        def on_train_start(self) -> None:
            super().on_train_start()
            self.seen: list[str] = []
            self.allreduce_calls = 0
            model = self.trainer.strategy.model
            if isinstance(model, DistributedDataParallel):  # count DDP's bucket all-reduces

                def counting_hook(state, bucket):
                    self.allreduce_calls += 1
                    return default_hooks.allreduce_hook(state, bucket)

                model.register_comm_hook(None, counting_hook)

        def on_train_batch_start(self, batch, batch_idx) -> None:
            self.seen.extend(batch.query_ids)

        def _no_sync(self):
            return nullcontext() if sync_every_chunk else super()._no_sync()

    return SGDModule(model=str(model_dir), **{**MODULE_DEFAULTS, **kwargs})


def make_data(data_dir: Path, batch_size: int):
    from datamodules.retrieval import RetrievalDataModule

    return RetrievalDataModule(str(data_dir), train_split="train", eval_split="test", groups_file=str(data_dir / "groups.jsonl"),
                               num_negatives=1, batch_size=batch_size, eval_batch_size=8, seed=0)


def make_trainer(strategy="auto", devices: int = 1, steps: int = 1, **kwargs):
    import lightning as L

    return L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=steps, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=0, **kwargs)


def full_parameters(module) -> dict[str, torch.Tensor]:
    """Every parameter, unsharded (``full_tensor`` of fully_shard's DTensors: a collective, call on all ranks)."""
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in module.named_parameters()}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def reference(model_dir: Path, data_dir: Path, steps: int = 1, evaluate: bool = False, **module_kwargs) -> dict:
    """One process, the whole global batch (8 queries)."""
    clip = module_kwargs.pop("clip", None)
    module, data = make_module(model_dir, **module_kwargs), make_data(data_dir, QUERIES)
    trainer = make_trainer(steps=steps, gradient_clip_val=clip)
    trainer.fit(module, datamodule=data)
    result = {"loss": trainer.callback_metrics["train/loss"].item(), "params": full_parameters(module), "seen": module.seen}
    if evaluate:
        trainer.test(module, datamodule=data, verbose=False)
        result["metrics"] = module.last_evaluation.metrics.aggregate
    return result


# ------------------------------------------------------------------ the 2-process worker (run by torchrun)
def worker(out: Path, spec: dict) -> None:
    import logging
    import warnings

    import torch.distributed as dist
    from lightning.pytorch.strategies import DDPStrategy

    from research.training.distributed import close_process_group
    from research.training.strategies import FullyShardStrategy

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    model_dir, data_dir = Path(spec["model_dir"]), Path(spec["data_dir"])
    for name, scenario in spec["scenarios"].items():
        if scenario.get("strategy", "ddp") == "ddp":
            strategy = DDPStrategy(process_group_backend="gloo", find_unused_parameters=scenario.get("find_unused", False))
        else:
            strategy = FullyShardStrategy(process_group_backend="gloo")
        module = make_module(model_dir, sync_every_chunk=scenario.get("sync_every_chunk", False), **scenario.get("module", {}))
        data = make_data(data_dir, LOCAL_BATCH)
        trainer = make_trainer(strategy, devices=WORLD, steps=scenario.get("steps", 1), gradient_clip_val=scenario.get("clip"))
        trainer.fit(module, datamodule=data)
        loss = trainer.callback_metrics["train/loss"].detach().clone()  # this rank's mean over its 4 queries
        dist.all_reduce(loss)
        seen: list = [None] * WORLD
        dist.all_gather_object(seen, module.seen)
        result = {"loss": loss.item() / WORLD, "params": full_parameters(module), "seen": seen,
                  "allreduce_calls": module.allreduce_calls, "steps": trainer.global_step}
        if scenario.get("evaluate"):
            trainer.test(module, datamodule=data, verbose=False)
            result["metrics"] = module.last_evaluation.metrics.aggregate
        if trainer.global_rank == 0:
            if scenario.get("save"):  # rank 0 alone, as the CLI does
                module.save_pretrained(out / f"{name}_model")
            torch.save(result, out / f"{name}.pt")
        dist.barrier()
    close_process_group()  # as the research CLI does: a gloo group left to interpreter exit can abort a rank


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp: Path, model_dir: Path, data_dir: Path, scenarios: dict) -> dict[str, dict]:
    """Run the scenarios in 2 CPU processes with torchrun (loopback only); the results rank 0 saved, by name."""
    out = tmp / "results"
    out.mkdir(parents=True, exist_ok=True)
    spec = json.dumps({"model_dir": str(model_dir), "data_dir": str(data_dir), "scenarios": scenarios})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={WORLD}",
               "--master-addr=127.0.0.1", f"--master-port={free_port()}", __file__, str(out), spec]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        pytest.fail(f"torchrun failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}")
    return {name: torch.load(out / f"{name}.pt", weights_only=False) for name in scenarios}


# ------------------------------------------------------------------ tests
DDP_SCENARIOS = {
    "gather": {"module": {"gather_across_devices": True}, "evaluate": True},
    "local_negatives": {"module": {"gather_across_devices": False}},
    "gradcache": {"module": {"gather_across_devices": True, "gradcache_chunk_size": 3}},
    "gradcache_two_towers": {"module": {"gather_across_devices": True, "gradcache_chunk_size": 3, "shared_towers": False},
                             "find_unused": True},
    "plain_2_steps": {"module": {"gather_across_devices": True}, "steps": 2},
    "gradcache_2_steps": {"module": {"gather_across_devices": True, "gradcache_chunk_size": 3}, "steps": 2},
    # every chunk's backward synchronised: chunks before the last do not reach log_scale, so DDP needs find_unused
    "gradcache_sync_every_chunk": {"module": {"gather_across_devices": True, "gradcache_chunk_size": 3},
                                   "sync_every_chunk": True, "find_unused": True},
}


@pytest.fixture(scope="module")
def setup_dirs(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("lightning_ddp")
    return make_model_dir(tmp / "model"), make_data_dir(tmp / "data")


@pytest.fixture(scope="module")
def ddp_results(setup_dirs, tmp_path_factory) -> dict[str, dict]:
    return launch(tmp_path_factory.mktemp("ddp_run"), *setup_dirs, DDP_SCENARIOS)


@pytest.fixture(scope="module")
def single(setup_dirs) -> dict:
    return reference(*setup_dirs, evaluate=True)


def report(name: str, result: dict, ref: dict) -> tuple[float, float]:
    loss_diff, param_diff = abs(result["loss"] - ref["loss"]), max_difference(result["params"], ref["params"])
    print(f"\n[{name}] 2-process vs single-process: loss {result['loss']:.6f} vs {ref['loss']:.6f} (diff {loss_diff:.2e}), "
          f"max parameter/gradient diff after one SGD(lr=1) step {param_diff:.2e}")
    return loss_diff, param_diff


def test_ranks_see_exactly_the_single_process_batch(ddp_results, single):
    for result in ddp_results.values():
        assert len(result["seen"][0]) == len(result["seen"][1]) == LOCAL_BATCH * result["steps"]
    assert ddp_results["gather"]["seen"][0] + ddp_results["gather"]["seen"][1] == single["seen"]


def test_mask_has_entries_across_ranks(setup_dirs):
    """In the single-process batch, some row masks another row's copy of its positive that lives on the other rank."""
    from datamodules.retrieval import EpochShuffleSampler

    module, data = make_module(setup_dirs[0]), make_data(setup_dirs[1], QUERIES)
    data.setup("fit")
    order = EpochShuffleSampler(QUERIES, seed=0)  # the single process's one batch, in its order
    batch = data._train_set.collate([data._train_set[key] for key in order])
    with torch.no_grad():
        _, _, mask = module.score_batch(batch)
    group = batch.group_size
    rows, cols = (~mask).nonzero(as_tuple=True)
    crossing = [(int(r), int(c)) for r, c in zip(rows, cols) if (r < LOCAL_BATCH) != (c < LOCAL_BATCH * group)]
    print(f"\nmasked entries across the rank boundary: {crossing}")
    assert crossing


@pytest.mark.parametrize("name", ["gather", "gradcache"])
def test_two_processes_with_gather_equal_one_process(ddp_results, single, name):
    loss_diff, param_diff = report(name, ddp_results[name], single)
    assert loss_diff < TOLERANCE and param_diff < TOLERANCE


def test_two_towers_gradcache_equals_one_process(ddp_results, setup_dirs):
    ref = reference(*setup_dirs, shared_towers=False)
    loss_diff, param_diff = report("gradcache_two_towers", ddp_results["gradcache_two_towers"], ref)
    assert loss_diff < TOLERANCE and param_diff < TOLERANCE


def test_without_gather_they_differ(ddp_results, single):
    loss_diff, param_diff = report("local_negatives (no gather)", ddp_results["local_negatives"], single)
    assert loss_diff > 1e-3 and param_diff > 1e-3


def test_distributed_evaluation_matches(ddp_results, single):
    metrics = ddp_results["gather"]["metrics"]
    print(f"\nevaluation after the step, 2 processes: {metrics}\n                        single process: {single['metrics']}")
    assert metrics.keys() == single["metrics"].keys()
    assert all(abs(metrics[k] - single["metrics"][k]) < 1e-4 for k in metrics)


def test_gradcache_syncs_gradients_once_per_step(ddp_results, setup_dirs):
    """block_backward_sync (= DDP no_sync) around all chunks but the last: as many bucket all-reduces per step as
    plain DDP, over 2 steps too (the reducer is left unprepared between steps); without it, one round per chunk."""
    plain, cached = ddp_results["plain_2_steps"]["allreduce_calls"], ddp_results["gradcache_2_steps"]["allreduce_calls"]
    every = ddp_results["gradcache_sync_every_chunk"]["allreduce_calls"]
    print(f"\nDDP bucket all-reduces: plain 2 steps {plain}, GradCache 2 steps {cached}, "
          f"GradCache 1 step without no_sync {every} (chunks per step: 2 query + 3 document)")
    assert plain > 0 and cached == plain
    assert every == 5 * plain // 2
    ref = reference(*setup_dirs, steps=2)
    for name in ("plain_2_steps", "gradcache_2_steps"):
        assert max_difference(ddp_results[name]["params"], ref["params"]) < TOLERANCE
    report("gradcache_sync_every_chunk", ddp_results["gradcache_sync_every_chunk"], reference(*setup_dirs))


def test_gradcache_single_process_equals_automatic_with_clipping(setup_dirs):
    """Manual optimisation under GradCache honours Trainer(gradient_clip_val) (clipping is active: unclipped differs)."""
    clipped = reference(*setup_dirs, clip=0.05)
    cached = reference(*setup_dirs, clip=0.05, gradcache_chunk_size=3)
    unclipped = reference(*setup_dirs)
    diff, active = max_difference(cached["params"], clipped["params"]), max_difference(unclipped["params"], clipped["params"])
    print(f"\nGradCache(3) vs automatic, gradient_clip_val=0.05, one process: loss diff {abs(cached['loss'] - clipped['loss']):.2e}, "
          f"max parameter diff {diff:.2e} (clipping changes parameters by {active:.2e})")
    assert abs(cached["loss"] - clipped["loss"]) < TOLERANCE and diff < TOLERANCE and active > 1e-3


def test_gradcache_refuses_gradient_accumulation(setup_dirs):
    module, data = make_module(setup_dirs[0], gradcache_chunk_size=3), make_data(setup_dirs[1], QUERIES)
    with pytest.raises(ValueError, match="replaces gradient accumulation"):
        make_trainer(accumulate_grad_batches=2).fit(module, datamodule=data)


if __name__ == "__main__":
    worker(Path(sys.argv[1]), json.loads(sys.argv[2]))
