"""``research zelo votes | fit | train``: the zELO loop (judge votes -> Thurstone scores -> student).

    research zelo votes --data scifact --split train --candidates bm25 --top-n 20 --cycles 4 \\
        --judge bm25:temperature=1.0 --judge model:runs/ce/model:temperature=1.0 --out votes.jsonl
    research zelo fit --votes votes.jsonl --out scores.jsonl --groups groups.jsonl
    research zelo train --config experiments/zelo/student.yaml   # = research fit --config ...
    research zelo qrels-groups --data scifact --split train --top-n 10 --out qrels_groups.jsonl  # baseline data
    research zelo qrels-groups --data scifact --split train --groups-from groups.jsonl --out both.jsonl  # + labels
"""

from __future__ import annotations

import argparse
import sys
import time

from research.cli.options import add_quiet
from research.cli.parser import ResearchParser
from research.errors import ResearchError
from research.models.runtime import PRECISIONS, resolve_device


def _judge_specs(args: argparse.Namespace) -> list[dict]:
    from research.zelo.judges import parse_judge_spec, read_judge_specs

    specs = [parse_judge_spec(s) for s in args.judge or []]
    if args.judges:
        specs += read_judge_specs(args.judges)
    if not specs:
        raise ResearchError("give at least one --judge SPEC or a --judges FILE")
    return specs


def cmd_votes(args: argparse.Namespace) -> None:
    from research.zelo.judges import JudgeError
    from research.zelo.workflow import prepare_votes

    specs = _judge_specs(args)
    device = resolve_device(args.device)
    started = time.perf_counter()
    job = prepare_votes(args.data, args.split, specs, args.out, candidates=args.candidates, top_n=args.top_n,
                        cycles=args.cycles, all_pairs=args.all_pairs, seed=args.seed, all_queries=args.all_queries,
                        max_queries=args.max_queries, batch_size=args.batch_size, device=device,
                        precision=args.precision)
    if job.changed:
        print(f"warning: resuming {job.out} with different settings ({', '.join(job.changed)}): its earlier votes are "
              f"kept and their pairs skipped", file=sys.stderr)

    try:
        stats = job.collect()  # progress: the "judging pairs" stage (research.progress; --quiet: none)
    except JudgeError as err:
        raise ResearchError(f"{err}; the votes collected so far are in {job.out}: re-run the same command to resume"
                            ) from None
    print(f"{len(job.candidates)} queries, {stats.planned} pairs: {stats.already} already in {job.out}, "
          f"{stats.collected} collected ({time.perf_counter() - started:.1f} s)")


def cmd_fit(args: argparse.Namespace) -> None:
    from research.zelo.workflow import fit_votes_file

    fitted = fit_votes_file(args.votes, args.out, model=args.model, prior=args.prior, groups=args.groups,
                            allow_truncated_tail=args.allow_truncated_tail)
    print(f"{fitted.votes} votes -> {fitted.scores} scores over {fitted.queries} queries ({args.model}, prior "
          f"{args.prior}): {args.out}")
    if args.groups:
        print(f"listwise groups (fields target, elo, logit): {args.groups}")


def cmd_qrels_groups(args: argparse.Namespace) -> None:
    from research.zelo.workflow import add_qrels_labels, write_qrels_groups

    if args.groups_from:
        given = [flag for flag, value in (("--candidates", args.candidates), ("--top-n", args.top_n),
                                          ("--max-queries", args.max_queries)) if value is not None]
        if given:
            raise ResearchError(f"--groups-from takes its queries and candidates from {args.groups_from}: drop "
                                f"{', '.join(given)}")
        count = add_qrels_labels(args.data, args.split, args.groups_from, args.out)
        print(f"{count} groups of {args.groups_from} with the qrels' labels added (field labels): {args.out}")
        return
    count = write_qrels_groups(args.data, args.split, args.out, candidates=args.candidates or "bm25",
                               top_n=20 if args.top_n is None else args.top_n, max_queries=args.max_queries)
    print(f"{count} qrels-labelled candidate groups (field labels): {args.out}")


def cmd_train(args: argparse.Namespace) -> None:
    from research.cli.lightning import run_lightning

    extra = [a for a in args.lightning_args if a != "--"]  # arguments zelo train does not know
    run_lightning(["fit", "--config", args.config, *extra])


class _PassThroughParser(ResearchParser):
    """A subparser that hands the arguments it does not know to Lightning (``zelo train``) instead of failing."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extra = super().parse_known_args(args, namespace)
        if getattr(namespace, "pass_through", False):
            namespace.lightning_args = [*getattr(namespace, "lightning_args", []), *extra]
            return namespace, []
        return namespace, extra


def register(sub) -> None:
    zelo = sub.add_parser("zelo", help="zELO: pairwise judge votes -> Thurstone scores -> student training",
                          description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    zsub = zelo.add_subparsers(dest="zelo_command", required=True, metavar="STEP", parser_class=_PassThroughParser)

    p = zsub.add_parser("votes", help="collect pairwise judge votes on each query's top-N candidates (resumable)")
    p.set_defaults(func=cmd_votes)
    p.add_argument("--data", required=True, help="dataset folder or name under $RESEARCH_DATA_DIR")
    p.add_argument("--split", default="train", help="qrels split whose judged queries are used")
    p.add_argument("--all-queries", action="store_true", help="all queries in queries.jsonl, judged or not")
    p.add_argument("--max-queries", type=int, default=None, help="only the first N queries")
    p.add_argument("--candidates", default="bm25", help="'bm25' (computed now) or a TREC run file")
    p.add_argument("--top-n", type=int, default=20, help="candidates per query")
    p.add_argument("--cycles", type=int, default=4, help="random Hamiltonian cycles per query (about 2 x cycles x N pairs)")
    p.add_argument("--all-pairs", action="store_true", help="judge all N(N-1)/2 pairs (small N)")
    p.add_argument("--seed", type=int, default=0, help="seed of each query's pair sample")
    p.add_argument("--judge", action="append", metavar="SPEC",
                   help="repeatable: bm25[:temperature=T] | model:DIR[:temperature=T] | llm:URL:MODEL:KEY_ENV[:k=v...]")
    p.add_argument("--judges", metavar="FILE", help="YAML/JSON list of judge specs (strings or mappings)")
    p.add_argument("--out", required=True, help="votes JSONL (appended to; existing pairs are skipped)")
    p.add_argument("--batch-size", type=int, default=32, help="pairs judged (and appended) per chunk")
    p.add_argument("--device", default="auto", help="device of model judges: cpu, cuda, ... (auto: cuda when available)")
    p.add_argument("--precision", choices=PRECISIONS, default="32-true", help="model judges; bf16-mixed: bfloat16 autocast")
    add_quiet(p)

    p = zsub.add_parser("fit", help="fit votes into per-document scores {query_id, doc_id, elo, target}")
    p.set_defaults(func=cmd_fit)
    p.add_argument("--votes", required=True, help="votes JSONL (research zelo votes)")
    p.add_argument("--out", required=True, help="scores JSONL")
    p.add_argument("--model", choices=("thurstone", "bradley-terry"), default="thurstone",
                   help="the paired-comparison model fitted to the votes")
    p.add_argument("--prior", type=float, default=0.01, help="Gaussian prior precision on the latent scores")
    p.add_argument("--groups", default=None, help="also write listwise groups JSONL for the student's DataModule")
    p.add_argument("--allow-truncated-tail", action="store_true", help="skip a cut-short last line of the votes file")

    p = zsub.add_parser("qrels-groups", help="the same candidate groups labelled by the qrels (a baseline student)")
    p.set_defaults(func=cmd_qrels_groups)
    p.add_argument("--data", required=True, help="dataset folder or name under $RESEARCH_DATA_DIR")
    p.add_argument("--split", default="train", help="qrels split whose judged queries and labels are used")
    p.add_argument("--max-queries", type=int, default=None, help="only the first N judged queries (as zelo votes)")
    p.add_argument("--candidates", default=None, help="'bm25' (computed now; the default) or a TREC run file")
    p.add_argument("--top-n", type=int, default=None, help="candidates per query (default 20)")
    p.add_argument("--groups-from", metavar="FILE", default=None,
                   help="label the groups of this file (e.g. zELO's) instead: its queries, documents, order and "
                        "fields are kept, labels added (not with --candidates, --top-n or --max-queries)")
    p.add_argument("--out", required=True, help="listwise groups JSONL {query_id, doc_ids, labels}")

    p = zsub.add_parser("train", help="train the student: research fit --config FILE [Lightning overrides]",
                        description="Alias of `research fit --config FILE ...`; extra arguments go to Lightning.")
    p.set_defaults(func=cmd_train, pass_through=True, lightning_args=[])
    p.add_argument("--config", required=True, help="e.g. experiments/zelo/student.yaml; other arguments go to "
                                                   "Lightning, e.g. --trainer.max_steps 10")
