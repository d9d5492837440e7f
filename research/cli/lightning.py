"""``research fit|validate|test|predict``: LightningCLI over composable YAML, with a run directory per run, W&B/CSV
tracking, default reliability callbacks and evaluation before and after ``fit``."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def run_lightning(argv: list[str]) -> None:
    from lightning.pytorch.cli import LightningCLI

    from research.cli.config_errors import one_line_config_errors
    from research.cli.retrieval import print_metrics as _print_metrics
    from research.eval.evaluation import save_evaluation
    from research.io import atomic_directory
    from research.runs import layout
    from research.runs.resume import check_resume
    from research.training.callbacks import (
        DEFAULT_CHECKPOINT_EVERY_N_STEPS,
        RedactingSaveConfigCallback,
        default_callbacks,
        install_atomic_checkpoint_io,
    )
    from research.training.tracking import default_logger, write_run_info

    class ResearchCLI(LightningCLI):
        """LightningCLI with a run directory per run, W&B/CSV tracking and evaluation before/after ``fit``."""

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--run_dir", type=str | None, default=None, help="run directory (default: runs/<name>/<time>)")
            parser.add_argument("--name", type=str | None, default=None, help="run name (default: the config file's stem)")
            parser.add_argument("--evaluate_before_fit", type=bool, default=False, help="test the starting model first")
            parser.add_argument("--test_after_fit", type=bool, default=True, help="test the trained model after fit")
            parser.add_argument("--save_model", type=bool, default=True, help="save_pretrained into <run_dir>/model")
            parser.add_argument("--skip_nonfinite_batches", type=bool, default=False, help="skip (not stop on) NaN/Inf losses")
            parser.add_argument("--checkpoint_every_n_steps", type=int, default=DEFAULT_CHECKPOINT_EVERY_N_STEPS,
                                help="step interval of the default checkpoint <run_dir>/checkpoints/last.ckpt (0: none)")

        def parse_arguments(self, parser, args) -> None:
            self._argv = list(args or [])
            with one_line_config_errors(args):  # config problems: one line naming file, line and field
                super().parse_arguments(parser, args)
            config = self.config.get(self.config.get("subcommand") or "", None)
            if config is not None:  # never overwrite an earlier run's checkpoints unasked; explain --ckpt_path last
                check_resume(self.config["subcommand"], config.get("run_dir"), config.get("ckpt_path"), self._argv)

        def instantiate_trainer(self, **kwargs):
            config = self.config[self.subcommand]
            configs = config.get("config") or []
            name = config.get("name") or (Path(str(configs[-1])).stem if configs else self.subcommand)
            run_dir = Path(config.get("run_dir") or layout.timestamped_run_dir(name))
            run_dir.mkdir(parents=True, exist_ok=True)
            self.run_dir = run_dir
            trainer_config = self.config_init[self.subcommand].get("trainer", {})
            kwargs["callbacks"] = default_callbacks(
                trainer_config.get("callbacks"), enable_checkpointing=trainer_config.get("enable_checkpointing"),
                skip_nonfinite_batches=config.get("skip_nonfinite_batches", False),
                checkpoint_every_n_steps=config.get("checkpoint_every_n_steps", DEFAULT_CHECKPOINT_EVERY_N_STEPS))
            if trainer_config.get("logger") in (None, True):
                kwargs["logger"] = default_logger(run_dir, name=f"{name}/{run_dir.name}", group=name)
            kwargs["default_root_dir"] = str(run_dir)
            write_run_info(run_dir, seed=config.get("seed_everything"))
            trainer = super().instantiate_trainer(**kwargs)
            install_atomic_checkpoint_io(trainer)  # temp file + fsync + rename; loads with weights_only=True
            for callback in trainer.checkpoint_callbacks:  # checkpoints live in the run directory
                if callback.dirpath is None:
                    callback.dirpath = str(run_dir / layout.CHECKPOINT_DIR)
            return trainer

        def _test_into(self, folder: str) -> dict[str, float] | None:
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
            evaluation = self.model.last_evaluation  # the contract: modules.base.RankingModule
            if evaluation is None:
                return None
            if self.trainer.is_global_zero:  # every rank runs the test loop (it has barriers); rank 0 writes
                save_evaluation(self.run_dir / folder, evaluation)
            return evaluation.metrics.aggregate

        def before_fit(self) -> None:
            self._started = time.perf_counter()
            self._before = self._test_into(layout.EVAL_BEFORE) if self.config.fit.evaluate_before_fit else None
            if self._before:
                _print_metrics("before fit", self._before)

        def after_fit(self) -> None:
            if self.config.fit.save_model and hasattr(self.model, "save_pretrained") and self.trainer.is_global_zero:
                with atomic_directory(self.run_dir / layout.MODEL_DIR) as folder:  # a complete model, or the previous one
                    self.model.save_pretrained(folder)
            after = self._test_into(layout.EVAL_AFTER) if self.config.fit.test_after_fit else None
            if not self.trainer.is_global_zero:
                return
            if self._before:
                _print_metrics("before fit", self._before)
            if after:
                _print_metrics("after fit ", after)
            print(f"run directory: {self.run_dir}  wall time: {time.perf_counter() - self._started:.0f} s")

        def after_test(self) -> None:
            evaluation = self.model.last_evaluation  # the contract: modules.base.RankingModule
            if evaluation is not None:
                save_evaluation(self.run_dir / layout.EVAL_DIR, evaluation)
                _print_metrics("test", evaluation.metrics.aggregate)

    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")  # main() passes argv
    ResearchCLI(
        args=argv,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=RedactingSaveConfigCallback,  # secrets redacted, written atomically
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"use_distributed_sampler": False},
        parser_kwargs={"parser_mode": "omegaconf"} if _has_omegaconf() else None,
    )


def _has_omegaconf() -> bool:
    try:
        import omegaconf  # noqa: F401
    except ImportError:
        return False
    return True
