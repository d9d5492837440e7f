"""The zELO collection loop: candidates -> pairs -> judge votes (resumable) -> scores -> student training data.

1. :func:`candidate_lists`: each query's top-N documents of a first-stage run (BM25 now, or a TREC run file);
2. :func:`plan_pairs`: per query, :func:`~research.zelo.pairs.sample_pairs` seeded with ``key_seed(seed, query_id)``
   (random Hamiltonian cycles, or all pairs);
3. :func:`collect_votes`: the pairs not yet in the votes file are judged in chunks and appended one flushed line per
   vote, so a crash or a failing judge loses at most the chunk in flight; re-running skips what is on disk;
4. :func:`research.zelo.fit.fit_votes` turns the votes into scores; :func:`write_groups` writes them as listwise
   groups for :class:`datamodules.reranking.ListwiseDataModule` (the student's training data).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from research.data.candidates import ranked_candidates
from research.data.votes import Vote, append_votes, read_votes, voted_pairs
from research.errors import ResearchError
from research.io import write_jsonl
from research.progress import stage
from research.seeds import key_seed
from research.zelo.fit import ELO_PER_NAT
from research.zelo.judges import Ensemble, Judge
from research.zelo.pairs import sample_pairs

if TYPE_CHECKING:
    from research.data.beir import RetrievalDataset


@dataclass(frozen=True)
class PlannedPair:
    query_id: str
    doc_a: str
    doc_b: str


@dataclass
class CollectStats:
    planned: int  # pairs the plan asks for
    already: int  # of those, found in the votes file
    collected: int  # votes appended by this call

    @property
    def missing(self) -> int:
        return self.planned - self.already - self.collected


def candidate_lists(data: RetrievalDataset, source: str, top_n: int,
                    query_ids: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Each query's top-``top_n`` documents (trec_eval order) from BM25 (``source == "bm25"``) or a TREC run file.

    ``query_ids`` defaults to the split's judged queries; a query with fewer than 2 candidates is left out.
    """
    from research.retrieval.rerank import candidate_run

    if top_n < 2:
        raise ResearchError(f"--top-n must be >= 2 (pairs need two documents), got {top_n}")
    query_ids = list(data.judged_queries if query_ids is None else query_ids)
    run = candidate_run(source, data, top_n, query_ids)
    out: dict[str, list[str]] = {}
    for query_id in query_ids:
        docs = ranked_candidates(data, run, query_id, top_n)
        if len(docs) >= 2:
            out[query_id] = docs
    return out


def plan_pairs(candidates: Mapping[str, Sequence[str]], cycles: int = 4, seed: int = 0,
               all_pairs: bool = False) -> list[PlannedPair]:
    """The pairs to judge, query by query; each query's sample is seeded by ``key_seed(seed, query_id)``."""
    return [PlannedPair(query_id, a, b) for query_id, docs in candidates.items()
            for a, b in sample_pairs(docs, cycles=cycles, seed=key_seed(seed, query_id), all_pairs=all_pairs)]


def _chunks(items: Sequence[PlannedPair], size: int) -> Iterator[Sequence[PlannedPair]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def collect_votes(data: RetrievalDataset, pairs: Sequence[PlannedPair], judge: Judge, out: str | Path,
                  batch_size: int = 32, progress: Callable[[int, int], None] | None = None) -> CollectStats:
    """Judge the pairs not yet in the votes file ``out`` and append their votes.

    An interrupted earlier run's truncated last line is tolerated (and cut off before appending). An
    :class:`~research.zelo.judges.Ensemble` records each judge's vote in ``judges``; any other judge records its
    own under its name. Votes are appended as each chunk of ``batch_size`` pairs is judged, so an exception
    (a judge failing after its retries, Ctrl-C) leaves every earlier chunk on disk.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = Path(out)
    done = voted_pairs(read_votes(out, allow_truncated_tail=True)) if out.is_file() else set()
    todo = [p for p in pairs if (p.query_id, frozenset((p.doc_a, p.doc_b))) not in done]
    stats = CollectStats(planned=len(pairs), already=len(pairs) - len(todo), collected=0)

    def votes() -> Iterator[Vote]:
        with stage("judging pairs", total=len(todo), unit="pairs") as step:
            yield from judged(step)

    def judged(step) -> Iterator[Vote]:
        for chunk in _chunks(todo, batch_size):
            queries = [data.queries[p.query_id] for p in chunk]
            docs_a = [data.corpus[p.doc_a].full_text for p in chunk]
            docs_b = [data.corpus[p.doc_b].full_text for p in chunk]
            if isinstance(judge, Ensemble):
                probabilities, per_judge = judge.judge_votes(queries, docs_a, docs_b)
            else:
                probabilities = judge.judge_pairs(queries, docs_a, docs_b)
                per_judge = [{judge.name: float(p)} for p in probabilities]
            for pair, p, judges in zip(chunk, probabilities, per_judge, strict=True):
                yield Vote(pair.query_id, pair.doc_a, pair.doc_b, min(1.0, max(0.0, float(p))), judges)
                stats.collected += 1
            step.advance(len(chunk))
            if progress is not None:
                progress(stats.already + stats.collected, stats.planned)

    if todo or not out.exists():
        append_votes(out, votes())
    return stats


def scores_to_groups(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Score records grouped by query: ``{query_id, doc_ids, target, elo, logit}`` (document order kept).

    ``logit`` = elo / (400 / ln 10) = logit(target): the Elo score in natural-log odds, the scale of a cross-encoder's
    logit; ``softmax(logit)`` is the softmax of the Elo scores at temperature 400 / ln 10.
    """
    groups: dict[str, dict[str, Any]] = {}
    for record in records:
        group = groups.setdefault(record["query_id"], {"query_id": record["query_id"], "doc_ids": [], "target": [],
                                                       "elo": [], "logit": []})
        group["doc_ids"].append(record["doc_id"])
        group["target"].append(float(record["target"]))
        group["elo"].append(float(record["elo"]))
        group["logit"].append(float(record["elo"]) / ELO_PER_NAT)
    return list(groups.values())


def write_groups(path: str | Path, records: Iterable[Mapping[str, Any]]) -> int:
    """Write :func:`scores_to_groups` as JSONL (the listwise format of :mod:`research.data.formats`); returns queries."""
    groups = scores_to_groups(records)
    for group in groups:
        if not all(math.isfinite(v) for v in group["logit"]):
            raise ValueError(f"query {group['query_id']}: non-finite scores")
    return write_jsonl(path, groups)


def qrels_groups(data: RetrievalDataset, candidates: Mapping[str, Sequence[str]]) -> list[dict[str, Any]]:
    """The same candidate groups labelled by the qrels instead (binary: grade >= 1), for a qrels-trained baseline."""
    return [{"query_id": query_id, "doc_ids": list(docs),
             "labels": [1.0 if data.qrels.get(query_id, {}).get(d, 0) >= 1 else 0.0 for d in docs]}
            for query_id, docs in candidates.items()]
