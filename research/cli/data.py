"""``research dev-split``: carve a seeded validation split from a dataset's training queries."""

from __future__ import annotations

import argparse


def cmd_dev_split(args: argparse.Namespace) -> None:
    from research.data.beir import resolve_dataset
    from research.data.splits import write_dev_split

    out = write_dev_split(resolve_dataset(args.data), args.out, from_split=args.from_split, dev_share=args.dev_share,
                          seed=args.seed)
    print(f"wrote {out} (qrels/train.tsv, qrels/dev.tsv; corpus and queries linked to {args.data})")


def register(sub) -> None:
    p = sub.add_parser("dev-split", help="carve a seeded dev split from a dataset's train queries (a new BEIR folder)")
    p.set_defaults(func=cmd_dev_split)
    p.add_argument("--data", required=True, help="dataset folder or name under $RESEARCH_DATA_DIR")
    p.add_argument("--out", required=True, help="the new BEIR folder (corpus and queries are symlinks)")
    p.add_argument("--from-split", default="train", help="the split to carve from (default: train)")
    p.add_argument("--dev-share", type=float, default=0.2, help="share of its queries that become dev (default: 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw (default: 0)")
