"""The ``research`` command: Lightning's ``fit/validate/test`` over composable YAML, plus evaluation tools.

    research fit --config experiments/scifact/bi_encoder.yaml
    research evaluate --model NAME_OR_DIR --data NAME_OR_DIR --split test --out DIR
    research bm25 --data NAME_OR_DIR --split test --out DIR
"""

from __future__ import annotations

import argparse
import os
import sys

from research import progress
from research.cli.lightning import LIGHTNING_SUBCOMMANDS, run_lightning
from research.cli.noise import silence_library_noise
from research.cli.parser import ResearchParser
from research.errors import ResearchError


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "transformers" in sys.modules:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    else:  # the same settings, read when transformers loads: a command that fails on its flags never pays for it
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    silence_library_noise()


# ---------------------------------------------------------------- other commands
# Each module registers its subcommands with ``register(subparsers)``.
COMMAND_MODULES = ("research.cli.data", "research.cli.retrieval", "research.cli.rerank", "research.cli.experiments",
                   "research.cli.zelo", "research.cli.mining", "research.cli.index")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = ResearchParser(prog="research", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")  # subparsers: ResearchParser too
    for name in LIGHTNING_SUBCOMMANDS:
        sub.add_parser(name, help=f"Lightning {name} from YAML configs (research {name} --help)", add_help=False)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _quiet_libraries()
        progress.configure(progress.AUTO)  # each command starts from the default (main() may run more than once)
        if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
            run_lightning(argv)
            return 0
        args = build_parser().parse_args(argv)
        if getattr(args, "quiet", False):
            progress.configure(progress.QUIET)
        args.func(args)
        return 0
    except ResearchError as err:
        print(f"research: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # an expected user error wrapped by a library (jsonargparse, transformers): one line too
        from research.errors import user_error

        message = user_error(err)
        if message is None or os.environ.get("RESEARCH_DEBUG"):
            raise
        print(f"research: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("research: interrupted", file=sys.stderr)
        return 130
    finally:
        if "torch.distributed" in sys.modules:  # a command that never imported torch started no process group
            from research.training.distributed import close_process_group

            close_process_group()


if __name__ == "__main__":
    sys.exit(main())
