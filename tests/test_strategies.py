"""The strategy overlays (experiments/strategies/*.yaml) compose with the SciFact config through the research CLI's
parser and build their Trainer and strategy; fully_shard (FSDP2 via ModelParallelStrategy) trains on 2 CPU processes
exactly like one process; activation checkpointing leaves the gradients unchanged.

On CPU without DeepSpeed: the DeepSpeed overlays are checked as parsed configs (their strategy needs deepspeed and a
GPU), and Lightning's fsdp overlay builds its strategy object, but its Trainer needs a GPU: those parts skip.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import lightning as L
import pytest
import torch
from test_lightning_ddp import (
    TOLERANCE,
    launch,
    make_data_dir,
    make_model_dir,
    max_difference,
    reference,
    report,
)

from research.losses import InfoNCE

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "experiments" / "scifact" / "bi_encoder.yaml"
OVERLAYS = {p.stem: p for p in sorted((REPO / "experiments" / "strategies").glob("*.yaml"))}
EXPECTED = {
    "ddp": "lightning.pytorch.strategies.DDPStrategy",
    "fsdp": "lightning.pytorch.strategies.FSDPStrategy",
    "model_parallel_fully_shard": "research.training.strategies.FullyShardStrategy",
    "deepspeed_zero2": "lightning.pytorch.strategies.DeepSpeedStrategy",
    "deepspeed_zero3": "lightning.pytorch.strategies.DeepSpeedStrategy",
    "deepspeed_zero3_offload": "lightning.pytorch.strategies.DeepSpeedStrategy",
}
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("strategies")
    return make_model_dir(tmp / "model"), make_data_dir(tmp / "data")


def parse(monkeypatch, *args: str):
    """The research CLI (research.cli.run_lightning) up to parsing: its parser, defaults and config composition."""
    import lightning.pytorch.cli as lightning_cli

    from research.cli.lightning import run_lightning

    captured = []

    class ParseOnly(lightning_cli.LightningCLI):
        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **{**kw, "run": False})

        def instantiate_classes(self) -> None:
            captured.append(self)

    monkeypatch.setattr(lightning_cli, "LightningCLI", ParseOnly)
    run_lightning(list(args))
    return captured[0]


def build_trainer(cli, tmp_path: Path) -> tuple[L.Trainer, object]:
    """Instantiate what the config names (model, data, callbacks, strategy) and the Trainer, as LightningCLI does."""
    init = cli.parser.instantiate_classes(cli.config)
    trainer_kwargs = {**init["trainer"], "logger": False, "default_root_dir": str(tmp_path)}
    return L.Trainer(**trainer_kwargs), init["model"]


def test_every_overlay_is_covered():
    assert set(OVERLAYS) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_overlay_parses_and_builds(name, dirs, monkeypatch, tmp_path):
    cli = parse(monkeypatch, "--config", str(BASE), "--config", str(OVERLAYS[name]),
                f"--model.init_args.model={dirs[0]}", f"--data.init_args.data={dirs[1]}")
    config = cli.config
    strategy = config.trainer.strategy
    print(f"\n{name}: strategy {strategy.class_path} {dict(strategy.init_args or {})}")
    assert strategy.class_path == EXPECTED[name]
    assert config.trainer.precision == "bf16-mixed"
    assert config.trainer.use_distributed_sampler is False
    assert config.model.init_args.gather_across_devices is True
    assert config.model.init_args.lr == 5.0e-5 and config.data.init_args.batch_size == 32  # the base config survives
    if name.startswith("deepspeed"):
        ds = strategy.init_args.config
        assert "gradient_clipping" in ds, "DeepSpeed clips to 1.0 when the key is missing"
        assert ds["zero_optimization"]["stage"] == (2 if name.endswith("zero2") else 3)
        assert ("offload_optimizer" in ds["zero_optimization"]) == name.endswith("offload")
        if not HAS_DEEPSPEED:
            pytest.skip("deepspeed is not installed (and DeepSpeedStrategy needs a CUDA GPU): config checked, not built")
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy
        from transformers.models.bert.modeling_bert import BertLayer

        init = cli.parser.instantiate_classes(cli.config)
        assert isinstance(init["trainer"]["strategy"], FSDPStrategy)
        assert init["trainer"]["strategy"].kwargs["auto_wrap_policy"]._module_classes == {BertLayer}
        if not torch.cuda.is_available():
            pytest.skip("Lightning's FSDPStrategy requires a GPU accelerator: strategy object built, Trainer not")
    trainer, module = build_trainer(cli, tmp_path)
    module_name, class_name = EXPECTED[name].rsplit(".", 1)
    assert isinstance(trainer.strategy, getattr(importlib.import_module(module_name), class_name))
    assert module.hparams.gather_across_devices


def test_gradient_checkpointing_leaves_the_step_unchanged(dirs):
    from test_lightning_ddp import QUERIES, make_data

    from modules.bi_encoder import BiEncoderModule

    data = make_data(dirs[1], QUERIES)
    data.setup("fit")
    batch = data._train_set.collate([data._train_set[(0, i)] for i in range(QUERIES)])
    for checkpointing, expected_calls in ((False, 2), (True, 4)):  # queries + documents, recomputed in backward
        module = BiEncoderModule(model=str(dirs[0]), gradient_checkpointing=checkpointing).train()
        calls = []
        module.encoder.query_encoder.encoder.layer[0].attention.register_forward_hook(lambda *_: calls.append(1))
        InfoNCE()(*module.score_batch(batch)).backward()
        assert len(calls) == expected_calls
    plain, checkpointed = reference(*dirs), reference(*dirs, gradient_checkpointing=True)
    diff = max_difference(plain["params"], checkpointed["params"])
    print(f"\nactivation checkpointing vs none, one SGD step: loss diff {abs(plain['loss'] - checkpointed['loss']):.2e}, "
          f"max parameter diff {diff:.2e}")
    assert abs(plain["loss"] - checkpointed["loss"]) < TOLERANCE and diff < TOLERANCE


FULLY_SHARD_SCENARIOS = {
    "fully_shard": {"strategy": "fully_shard", "module": {"gather_across_devices": True}, "evaluate": True, "save": True},
    # manual optimisation clips itself: Trainer(gradient_clip_val) over DTensor (sharded) and plain (log_scale) gradients
    "fully_shard_gradcache_clipped": {"strategy": "fully_shard", "module": {"gather_across_devices": True, "gradcache_chunk_size": 3},
                                      "clip": 0.05},
}


@pytest.fixture(scope="module")
def fully_shard_results(dirs, tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("fully_shard_run")
    results = launch(tmp, *dirs, FULLY_SHARD_SCENARIOS)
    results["fully_shard"]["saved"] = tmp / "results" / "fully_shard_model"
    return results


@pytest.mark.parametrize("name", sorted(FULLY_SHARD_SCENARIOS))
def test_fully_shard_two_processes_equal_one_process(fully_shard_results, dirs, name):
    scenario = FULLY_SHARD_SCENARIOS[name]
    ref = reference(*dirs, evaluate="metrics" in fully_shard_results[name], clip=scenario.get("clip"))
    result = fully_shard_results[name]
    loss_diff, param_diff = report(name, result, ref)
    assert result["seen"][0] + result["seen"][1] == ref["seen"]
    assert loss_diff < TOLERANCE and param_diff < TOLERANCE
    if "metrics" in result:
        assert all(abs(result["metrics"][k] - ref["metrics"][k]) < 1e-4 for k in ref["metrics"])
    if "saved" in result:  # rank 0 saved the gathered (unsharded) weights after training
        from research.models.bi_encoder import BiEncoder

        saved = BiEncoder.from_pretrained(result["saved"]).state_dict()
        trained = {k.removeprefix("encoder."): v for k, v in ref["params"].items() if k.startswith("encoder.")}
        assert max((saved[k] - v).abs().max().item() for k, v in trained.items()) < TOLERANCE
