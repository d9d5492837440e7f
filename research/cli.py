"""The ``research`` command: Lightning's ``fit/validate/test`` over composable YAML, plus evaluation tools.

    research fit --config experiments/scifact/bi_encoder.yaml
    research evaluate --model NAME_OR_DIR --data NAME_OR_DIR --split test --out DIR
    research bm25 --data NAME_OR_DIR --split test --out DIR
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from research.errors import ResearchError

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _print_metrics(title: str, metrics: dict[str, float]) -> None:
    print(f"{title}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


# ---------------------------------------------------------------- Lightning subcommands
def run_lightning(argv: list[str]) -> None:
    from lightning.pytorch.cli import LightningCLI

    from research.evaluation import save_evaluation
    from research.tracking import default_logger, write_run_info

    class ResearchCLI(LightningCLI):
        """LightningCLI with a run directory per run, W&B/CSV tracking and evaluation before/after ``fit``."""

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--run_dir", type=str | None, default=None, help="run directory (default: runs/<name>/<time>)")
            parser.add_argument("--name", type=str | None, default=None, help="run name (default: the config file's stem)")
            parser.add_argument("--evaluate_before_fit", type=bool, default=False, help="test the starting model first")
            parser.add_argument("--test_after_fit", type=bool, default=True, help="test the trained model after fit")
            parser.add_argument("--save_model", type=bool, default=True, help="save_pretrained into <run_dir>/model")

        def instantiate_trainer(self, **kwargs):
            config = self.config[self.subcommand]
            configs = config.get("config") or []
            name = config.get("name") or (Path(str(configs[-1])).stem if configs else self.subcommand)
            run_dir = Path(config.get("run_dir") or Path("runs") / name / datetime.now().strftime("%Y%m%d-%H%M%S"))
            run_dir.mkdir(parents=True, exist_ok=True)
            self.run_dir = run_dir
            trainer_config = self.config_init[self.subcommand].get("trainer", {})
            if trainer_config.get("logger") in (None, True):
                kwargs["logger"] = default_logger(run_dir, name=f"{name}/{run_dir.name}", group=name)
            kwargs["default_root_dir"] = str(run_dir)
            write_run_info(run_dir, seed=config.get("seed_everything"))
            return super().instantiate_trainer(**kwargs)

        def _test_into(self, folder: str) -> dict[str, float] | None:
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
            evaluation = getattr(self.model, "last_evaluation", None)
            if evaluation is None:
                return None
            save_evaluation(self.run_dir / folder, evaluation)
            return evaluation.metrics.aggregate

        def before_fit(self) -> None:
            self._started = time.perf_counter()
            self._before = self._test_into("eval_before") if self.config.fit.evaluate_before_fit else None
            if self._before:
                _print_metrics("before fit", self._before)

        def after_fit(self) -> None:
            if self.trainer.global_rank != 0 and self.trainer.world_size > 1:
                return
            if self.config.fit.save_model and hasattr(self.model, "save_pretrained"):
                self.model.save_pretrained(self.run_dir / "model")
            after = self._test_into("eval_after") if self.config.fit.test_after_fit else None
            if self._before:
                _print_metrics("before fit", self._before)
            if after:
                _print_metrics("after fit ", after)
            print(f"run directory: {self.run_dir}  wall time: {time.perf_counter() - self._started:.0f} s")

        def after_test(self) -> None:
            evaluation = getattr(self.model, "last_evaluation", None)
            if evaluation is not None:
                save_evaluation(self.run_dir / "eval", evaluation)
                _print_metrics("test", evaluation.metrics.aggregate)

    ResearchCLI(
        args=argv,
        subclass_mode_model=True,
        subclass_mode_data=True,
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


# ---------------------------------------------------------------- evaluation tools
def _trainer(precision: str):
    import lightning as L

    return L.Trainer(accelerator="auto", devices=1, precision=precision, logger=False, enable_checkpointing=False,
                     enable_model_summary=False, use_distributed_sampler=False)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from datamodules.retrieval import RetrievalDataModule
    from modules.bi_encoder import BiEncoderModule
    from research.evaluation import save_evaluation

    module = BiEncoderModule(model=args.model, document_max_length=args.max_length, query_max_length=args.max_length,
                             eval_top_k=args.top_k, trust_remote_code=args.trust_remote_code)
    data = RetrievalDataModule(args.data, train_split=None, eval_split=args.split, eval_batch_size=args.batch_size)
    started = time.perf_counter()
    _trainer(args.precision).test(module, datamodule=data, verbose=False)
    evaluation = module.last_evaluation
    save_evaluation(args.out, evaluation, tag="dense", model=str(args.model), data=str(args.data), split=args.split,
                    seconds=round(time.perf_counter() - started, 2))
    _print_metrics(f"{args.model} on {args.data}/{args.split}", evaluation.metrics.aggregate)
    print(f"wrote {Path(args.out) / 'run.trec'} and {Path(args.out) / 'metrics.json'}")


def cmd_bm25(args: argparse.Namespace) -> None:
    from datamodules.beir import load_dataset
    from research.bm25 import BM25Config, bm25_search
    from research.evaluation import evaluate_run, save_evaluation

    data = load_dataset(args.data, args.split)
    started = time.perf_counter()
    config = BM25Config(k1=args.k1, b=args.b)
    run = bm25_search(data, k=args.top_k, config=config)
    evaluation = evaluate_run(run, data.qrels)
    save_evaluation(args.out, evaluation, tag="bm25", data=str(args.data), split=args.split, k1=args.k1, b=args.b,
                    seconds=round(time.perf_counter() - started, 2))
    _print_metrics(f"BM25 on {args.data}/{args.split}", evaluation.metrics.aggregate)
    print(f"wrote {Path(args.out) / 'run.trec'} and {Path(args.out) / 'metrics.json'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="research", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in LIGHTNING_SUBCOMMANDS:
        sub.add_parser(name, help=f"Lightning {name} from YAML configs (research {name} --help)", add_help=False)

    def command(name: str, func: Callable, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = command("evaluate", cmd_evaluate, "dense retrieval evaluation: encode, exact faiss search, run + metrics")
    p.add_argument("--model", required=True, help="model directory, packaged name or hub id")
    p.add_argument("--data", required=True, help="dataset folder or name under $RESEARCH_DATA_DIR")
    p.add_argument("--split", default="test")
    p.add_argument("--out", required=True, help="output directory for run.trec and metrics.json")
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-length", type=int, default=None, help="override query and document max length")
    p.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed")
    p.add_argument("--trust-remote-code", action="store_true")

    p = command("bm25", cmd_bm25, "BM25 retrieval with bm25s: run + metrics")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--out", required=True)
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--k1", type=float, default=1.5)
    p.add_argument("--b", type=float, default=0.75)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _quiet_libraries()
        if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
            run_lightning(argv)
            return 0
        args = build_parser().parse_args(argv)
        args.func(args)
        return 0
    except ResearchError as err:
        print(f"research: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("research: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
