"""A validation split carved from a training split: a seeded share of the training queries becomes ``dev``.

BEIR SciFact (and other sets) publish no dev split; every recipe choice (epochs, learning rate, stages, weights, exit
layers) is made on this one instead of on test. The carve is deterministic in (source qrels, share, seed): the same
queries land in dev on every machine. :func:`write_dev_split` writes a BEIR folder whose ``corpus.jsonl`` and
``queries.jsonl`` link to the source (nothing is copied) and whose ``qrels/`` holds ``train.tsv`` (the rest),
``dev.tsv`` (the carved share) and every other split of the source unchanged, plus ``split.json`` saying how.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from research.data.trec import Qrels, read_tsv_qrels
from research.errors import ResearchError
from research.io import atomic_directory, atomic_write

SPLIT_INFO = "split.json"


def carve_dev(qrels: Qrels, dev_share: float, seed: int) -> tuple[Qrels, Qrels]:
    """``(rest, dev)``: ``round(dev_share * queries)`` queries of ``qrels`` drawn with ``random.Random(seed)`` from
    the sorted query ids, so the draw does not depend on file order."""
    if not 0.0 < dev_share < 1.0:
        raise ResearchError(f"dev share must be in (0, 1), got {dev_share}")
    queries = sorted(qrels)
    count = round(dev_share * len(queries))
    if count < 1 or count >= len(queries):
        raise ResearchError(f"a dev share of {dev_share} of {len(queries)} queries leaves an empty split")
    dev = set(random.Random(seed).sample(queries, count))
    return ({q: dict(qrels[q]) for q in queries if q not in dev}, {q: dict(qrels[q]) for q in queries if q in dev})


def _write_qrels(path: Path, qrels: Qrels) -> None:
    with atomic_write(path) as handle:
        handle.write("query-id\tcorpus-id\tscore\n")
        for query_id, docs in qrels.items():
            for doc_id, grade in docs.items():
                handle.write(f"{query_id}\t{doc_id}\t{grade}\n")


def write_dev_split(source: str | Path, out: str | Path, from_split: str = "train", dev_share: float = 0.2,
                    seed: int = 0) -> Path:
    """Write the BEIR folder ``out``: ``source``'s corpus and queries (symlinked), its ``from_split`` qrels split
    into ``train.tsv`` and ``dev.tsv``, and its other qrels splits linked unchanged. Replaces ``out`` atomically."""
    source, out = Path(source).resolve(), Path(out)
    qrels_dir = source / "qrels"
    train_file = qrels_dir / f"{from_split}.tsv"
    if not train_file.is_file():
        raise ResearchError(f"{train_file}: no '{from_split}' split to carve a dev split from")
    if (qrels_dir / "dev.tsv").exists():
        raise ResearchError(f"{qrels_dir / 'dev.tsv'} exists: {source} has a dev split of its own; use it")
    rest, dev = carve_dev(read_tsv_qrels(train_file), dev_share, seed)
    with atomic_directory(out) as folder:
        for name in ("corpus.jsonl", "queries.jsonl"):
            os.symlink(source / name, folder / name)
        (folder / "qrels").mkdir()
        for other in sorted(qrels_dir.glob("*.tsv")):
            if other.stem != from_split:
                os.symlink(other, folder / "qrels" / other.name)
        _write_qrels(folder / "qrels" / "train.tsv", rest)
        _write_qrels(folder / "qrels" / "dev.tsv", dev)
        info = {"source": str(source), "from_split": from_split, "dev_share": dev_share, "seed": seed,
                "train_queries": len(rest), "dev_queries": len(dev)}
        (folder / SPLIT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return out
