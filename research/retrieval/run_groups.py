"""Training groups from any run (a TREC run file, e.g. an evaluation's ``run.trec``) plus qrels.

Positives come from the qrels; negatives from the run's ranking, through the filters of
:mod:`research.retrieval.negatives` that need no retriever vectors (labelled documents, rank window, score cap,
count cap). The records are the groups JSONL that ``RetrievalDataModule(groups_file=...)`` reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from research.data.beir import RetrievalDataset
from research.data.trec import Qrels, Run, ranking, read_run
from research.errors import DataFormatError
from research.io import iter_lines, write_jsonl
from research.retrieval.negatives import (
    Candidate,
    MiningConfig,
    MiningStats,
    positives_and_excluded,
    select_negatives,
)


def run_to_groups(run: Run, qrels: Qrels, config: MiningConfig, relevance_level: int = 1,
                  ) -> tuple[list[dict[str, Any]], MiningStats, int]:
    """Groups from any run file plus qrels: positives from qrels, negatives from the run (filters 1, 2, 5 and 7).

    Ranks follow trec_eval order over the whole run row. Returns records (qrels order), stats, and the number of
    judged queries the run does not contain (they get no group).
    """
    positives, excluded = positives_and_excluded(qrels, relevance_level)
    stats = MiningStats()
    records, missing = [], 0
    for qid, pos in positives.items():
        if qid not in run:
            missing += 1
            continue
        candidates = [Candidate(d, rank, float(s)) for rank, (d, s) in enumerate(ranking(run[qid]), start=1)]
        kept = select_negatives(candidates, excluded[qid], None, config, stats)
        records.append({
            "query_id": qid, "positives": pos, "negatives": [c.doc_id for c in kept],
            "negative_ranks": [c.rank for c in kept], "negative_retriever_scores": [c.score for c in kept],
        })
    return records, stats, missing


def write_run_groups(run_path: str | Path, data: RetrievalDataset, config: MiningConfig, out: str | Path,
                     relevance_level: int = 1) -> tuple[int, MiningStats, int]:
    """:func:`run_to_groups` of a run file against ``data``'s qrels, written to ``out`` (atomically).

    Every negative must be a document of ``data`` (else the run file's line is named). Returns the number of groups
    written, the filter counts and the number of judged queries the run does not contain.
    """
    run = read_run(run_path)
    if not run:
        raise DataFormatError(run_path, None, None, "no run lines")
    records, stats, missing = run_to_groups(run, data.qrels, config, relevance_level)
    for record in records:
        for doc_id in record["negatives"]:
            if doc_id not in data.corpus:
                line = next((n for n, text in iter_lines(run_path) if text.split()[0:3:2] == [record["query_id"], doc_id]), None)
                raise DataFormatError(run_path, line, "doc_id", f"unknown document '{doc_id}' (query '{record['query_id']}'), "
                                      f"not in {data.path / 'corpus.jsonl'}")
    write_jsonl(out, records)
    return len(records), stats, missing
