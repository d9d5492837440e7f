"""``research fit|validate|test|predict``: LightningCLI over composable YAML, with a run directory per run, W&B/CSV
tracking, default reliability callbacks and evaluation before and after ``fit``."""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def _research_cli(parse_only: bool = False):
    """The LightningCLI class of ``research fit`` etc.; ``parse_only``: one that stops after parsing, raising
    :class:`ParsedOnly`, and leaves the run directory alone (no resume bookkeeping)."""
    from jsonargparse import ActionYesNo
    from lightning.pytorch.cli import LightningCLI

    from research.cli.config_errors import one_line_config_errors
    from research.cli.fit_plan import describe_fit
    from research.cli.retrieval import print_metrics as _print_metrics
    from research.eval.evaluation import save_evaluation
    from research.io import atomic_directory
    from research.runs import layout
    from research.runs.resume import check_resume
    from research.training.callbacks import (
        DEFAULT_CHECKPOINT_EVERY_N_STEPS,
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
            parser.add_argument("--overwrite", action=ActionYesNo(), nargs="?", default=False,
                                help="fit: replace the finished run (model/, eval_after/) that --run_dir holds "
                                     "(--overwrite, --overwrite true|false or --no_overwrite)")

        def parse_arguments(self, parser, args) -> None:
            self._argv = list(args or [])
            subcommand = self._argv[0] if self._argv and self._argv[0] in self.subcommands() else None
            sub = getattr(self, "_subcommand_parsers", {}).get(subcommand) if subcommand else None
            options = [s for action in (sub or parser)._actions for s in action.option_strings if s.startswith("--")]
            with one_line_config_errors(args, options):  # config problems: one line naming file, line and field
                super().parse_arguments(parser, args)
            config = self.config.get(self.config.get("subcommand") or "", None)
            if config is not None and not parse_only:  # never overwrite an earlier run unasked; explain --ckpt_path last
                check_resume(self.config["subcommand"], config.get("run_dir"), config.get("ckpt_path"), self._argv,
                             overwrite=bool(config.get("overwrite")))

        if parse_only:
            def _set_seed(self) -> None:  # nothing runs: leave the global seed (and its log line) alone
                pass

            def before_instantiate_classes(self) -> None:
                raise ParsedOnly()

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
                checkpoint_every_n_steps=config.get("checkpoint_every_n_steps", DEFAULT_CHECKPOINT_EVERY_N_STEPS),
                validation_history=run_dir / layout.VAL_HISTORY_FILE)
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

        def _test_into(self, folder: str, ckpt_path: str | None = None) -> dict[str, float] | None:
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=False, ckpt_path=ckpt_path)
            evaluation = self.model.last_evaluation  # the contract: modules.base.RankingModule
            if evaluation is None:
                return None
            if self.trainer.is_global_zero:  # every rank runs the test loop (it has barriers); rank 0 writes
                save_evaluation(self.run_dir / folder, evaluation)
            return evaluation.metrics.aggregate

        def before_fit(self) -> None:
            self._started = time.perf_counter()
            if self.trainer.is_global_zero:  # what the run will do, before the first minute of waiting
                print(describe_fit(self.config.fit, self.run_dir, self.trainer, self.datamodule), file=sys.stderr,
                      flush=True)
            self._before = self._test_into(layout.EVAL_BEFORE) if self.config.fit.evaluate_before_fit else None
            if self._before:
                _print_metrics("before fit", self._before)

        def after_fit(self) -> None:
            best = selected_checkpoint(self.trainer)
            if best is not None:  # the val metric chose these weights: they are the model saved and tested
                strategy = self.trainer.strategy
                strategy.load_model_state_dict(strategy.load_checkpoint(best.best_model_path))
            if self.config.fit.save_model and hasattr(self.model, "save_pretrained") and self.trainer.is_global_zero:
                with atomic_directory(self.run_dir / layout.MODEL_DIR) as folder:  # a complete model, or the previous one
                    self.model.save_pretrained(folder)
            after = self._test_into(layout.EVAL_AFTER, best and best.best_model_path) if self.config.fit.test_after_fit \
                else None
            if not self.trainer.is_global_zero:
                return
            if best is not None:
                print(f"selected checkpoint: {best.best_model_path} ({best.monitor} {float(best.best_model_score):.4f})")
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

    return ResearchCLI


def selected_checkpoint(trainer):
    """The monitored ``ModelCheckpoint`` whose best checkpoint ``research fit`` saves and tests; ``None`` without one.
    A monitored one that saved nothing (validation never ran) is an error, not a silent test of the last weights."""
    from research.errors import ResearchError

    monitored = [c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)]
    if len({c.monitor for c in monitored}) > 1:
        raise ResearchError(f"ModelCheckpoints monitor {sorted({c.monitor for c in monitored})}: keep one monitored "
                            "ModelCheckpoint, whose best checkpoint is the run's model")
    if not monitored:
        return None
    if not monitored[0].best_model_path:
        raise ResearchError(f"ModelCheckpoint(monitor='{monitored[0].monitor}') saved no checkpoint: validation never "
                            "ran (set the DataModule's val_split and trainer.limit_val_batches > 0)")
    return monitored[0]


class ParsedOnly(Exception):
    """Raised by the parse-only CLI of :func:`check_fit_arguments` once the arguments parsed."""


def _cli_kwargs() -> dict:
    from research.training.callbacks import RedactingSaveConfigCallback

    return dict(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=RedactingSaveConfigCallback,  # secrets redacted, written atomically
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"use_distributed_sampler": False},
        # no prefix matching: --trainer.max_step is an error (with the nearest flag), never max_steps
        parser_kwargs={"allow_abbrev": False, **({"parser_mode": "omegaconf"} if _has_omegaconf() else {})},
    )


def run_lightning(argv: list[str]) -> None:
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")  # main() passes argv
    _research_cli()(args=argv, **_cli_kwargs())


def check_fit_arguments(argv: list[str]) -> None:
    """Parse ``research fit ARGV`` (configs composed, every key and class_path checked) without building the model or
    data, and without touching the run directory: a :class:`research.errors.ResearchError` when it would fail at the
    start."""
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    try:
        _research_cli(parse_only=True)(args=["fit", *argv], **_cli_kwargs())
    except ParsedOnly:
        return


def _has_omegaconf() -> bool:
    try:
        import omegaconf  # noqa: F401
    except ImportError:
        return False
    return True
