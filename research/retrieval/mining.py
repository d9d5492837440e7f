"""Hard-negative mining, teacher scoring and run-to-groups: training groups for :mod:`research.data.groups`.

Mining encodes the corpus once into an exact ``faiss.IndexFlatIP`` and searches it in QUERY BATCHES, so memory is
the index plus one batch (``query_batch × depth`` candidates): never a query × corpus matrix, whatever the number
of queries. For each query, candidates are the retriever's top ``depth`` documents; each candidate passes, in this
order, the filters below, and the first one that rejects it is the one it is counted against (``MiningStats``):

1. ``positive``         every labelled document of the query (any qrels grade > 0), however many it has;
2. ``rank_window``      keep retrieval ranks ``rank_min..rank_max`` (1-based, counted over the full ranking,
                        positives included: rank 1 is the retriever's top document);
3. ``margin``           keep ``score < min_positive_score - margin`` (absolute margin);
4. ``relative_margin``  keep ``score < min_positive_score * (1 - relative_margin)``;
5. ``max_score``        keep ``score <= max_score``;
6. ``rescorer``         keep ``teacher_score <= max_rescore_score`` (a cross-encoder's view of false negatives);
7. ``num_negatives``    keep the best-ranked ``num_negatives`` survivors.

``min_positive_score`` is the retriever's lowest score over the query's positives (the strictest choice when a
query has several). Retriever scores are recomputed exactly, in float64 per (query, document) pair from the stored
float32 vectors, so that the output does not depend on the query batch size (faiss' BLAS path does).

Output records (one per query with at least one positive; JSONL that ``RetrievalDataModule(groups_file=...)`` reads)::

    {"query_id", "positives", "negatives", "negative_ranks",
     "positive_retriever_scores", "negative_retriever_scores",
     "positive_scores", "negative_scores"}          # the last two: teacher (rescorer) scores, only with a rescorer

The output file is written atomically; with ``progress_dir`` each finished query batch (and the corpus embeddings)
is kept there, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from research.data.trec import Qrels, Run, ranking
from research.errors import DataFormatError, ResearchError
from research.io import atomic_write, iter_jsonl, write_json, write_jsonl

FILTERS = ("positive", "rank_window", "margin", "relative_margin", "max_score", "rescorer", "num_negatives")

# (query ids, document ids per query) -> teacher scores per query, aligned with the document ids
Rescorer = Callable[[list[str], list[list[str]]], list[list[float]]]


@dataclass(frozen=True)
class MiningConfig:
    """Which retrieved documents become negatives (see the module docstring for the order of the filters)."""

    depth: int = 100
    rank_min: int = 1
    rank_max: int | None = None
    margin: float | None = None
    relative_margin: float | None = None
    max_score: float | None = None
    num_negatives: int | None = None
    max_rescore_score: float | None = None

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ResearchError(f"depth must be >= 1, got {self.depth}")
        if self.rank_min < 1 or (self.rank_max is not None and self.rank_max < self.rank_min):
            raise ResearchError(f"rank window {self.rank_min}:{self.rank_max} is empty or starts below 1")
        if self.rank_max is not None and self.rank_max > self.depth:
            raise ResearchError(f"rank window ends at {self.rank_max}, beyond the retrieval depth {self.depth}")
        if self.rank_min > self.depth:
            raise ResearchError(f"rank window starts at {self.rank_min}, beyond the retrieval depth {self.depth}")
        if self.margin is not None and self.margin < 0:
            raise ResearchError(f"margin must be >= 0, got {self.margin}")
        if self.relative_margin is not None and not 0 <= self.relative_margin <= 1:
            raise ResearchError(f"relative margin must be in [0, 1], got {self.relative_margin}")
        if self.num_negatives is not None and self.num_negatives < 0:
            raise ResearchError(f"num_negatives must be >= 0, got {self.num_negatives}")

    @property
    def last_rank(self) -> int:
        return self.depth if self.rank_max is None else self.rank_max


def parse_rank_window(text: str | None) -> tuple[int, int | None]:
    """``"10:100"`` -> ``(10, 100)``; ``"10:"`` -> ``(10, None)``; ``":50"`` -> ``(1, 50)``; ``None`` -> ``(1, None)``."""
    if text is None:
        return 1, None
    start, sep, stop = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return (int(start) if start.strip() else 1), (int(stop) if stop.strip() else None)
    except ValueError:
        raise ResearchError(f"rank window '{text}': expected FIRST:LAST (1-based, inclusive), e.g. 10:100") from None


@dataclass
class MiningStats:
    """Candidates seen and, per filter, how many it removed (each candidate counted against the first filter)."""

    queries: int = 0
    candidates: int = 0
    removed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FILTERS, 0))
    kept: int = 0
    queries_without_negatives: int = 0

    def add(self, other: MiningStats) -> None:
        self.queries += other.queries
        self.candidates += other.candidates
        self.kept += other.kept
        self.queries_without_negatives += other.queries_without_negatives
        for name, count in other.removed.items():
            self.removed[name] = self.removed.get(name, 0) + count

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MiningStats:
        return cls(queries=data["queries"], candidates=data["candidates"], removed=dict(data["removed"]),
                   kept=data["kept"], queries_without_negatives=data["queries_without_negatives"])

    def table(self) -> str:
        lines = [f"queries {self.queries}  candidates {self.candidates}"]
        lines += [f"  removed by {name:<16} {count:>10}" for name, count in self.removed.items()]
        lines.append(f"  kept as negatives         {self.kept:>10}   (queries left without any: {self.queries_without_negatives})")
        return "\n".join(lines)


@dataclass
class Candidate:
    doc_id: str
    rank: int
    score: float
    teacher: float | None = None


def select_negatives(candidates: list[Candidate], excluded: set[str] | frozenset[str], positive_score: float | None,
                     config: MiningConfig, stats: MiningStats, rescore: Callable[[list[Candidate]], None] | None = None,
                     ) -> list[Candidate]:
    """Filters 1-7 over one query's ranked ``candidates`` (best first); counts removals into ``stats``.

    ``rescore`` (optional) fills ``Candidate.teacher`` of the survivors of filters 1-5 in place.
    """
    removed = stats.removed
    stats.candidates += len(candidates)
    kept = []
    for cand in candidates:
        if cand.doc_id in excluded:
            removed["positive"] += 1
        elif not config.rank_min <= cand.rank <= config.last_rank:
            removed["rank_window"] += 1
        elif config.margin is not None and positive_score is not None and not cand.score < positive_score - config.margin:
            removed["margin"] += 1
        elif (config.relative_margin is not None and positive_score is not None
              and not cand.score < positive_score * (1.0 - config.relative_margin)):
            removed["relative_margin"] += 1
        elif config.max_score is not None and not cand.score <= config.max_score:
            removed["max_score"] += 1
        else:
            kept.append(cand)
    if rescore is not None:
        if kept:
            rescore(kept)
        if config.max_rescore_score is not None:
            survivors = [c for c in kept if c.teacher <= config.max_rescore_score]
            removed["rescorer"] += len(kept) - len(survivors)
            kept = survivors
    if config.num_negatives is not None and len(kept) > config.num_negatives:
        removed["num_negatives"] += len(kept) - config.num_negatives
        kept = kept[:config.num_negatives]
    stats.kept += len(kept)
    stats.queries += 1
    stats.queries_without_negatives += not kept
    return kept


def positives_and_excluded(qrels: Qrels, relevance_level: int = 1) -> tuple[dict[str, list[str]], dict[str, frozenset[str]]]:
    """Per query: positives (grade >= ``relevance_level``) and every labelled document (grade > 0), never a negative.

    Queries without a positive are left out.
    """
    positives, excluded = {}, {}
    for qid, docs in qrels.items():
        pos = [d for d, grade in docs.items() if grade >= relevance_level]
        if pos:
            positives[qid] = pos
            excluded[qid] = frozenset(d for d, grade in docs.items() if grade > 0) | frozenset(pos)
    return positives, excluded


# ---------------------------------------------------------------- dense index
class DenseIndex:
    """An exact inner-product index over float32 document vectors; the vectors are read back from faiss (no copy)."""

    def __init__(self, doc_embeddings: np.ndarray | Iterable[np.ndarray], doc_ids: list[str]) -> None:
        """``doc_embeddings``: ``[N, D]``, or an iterable of row blocks (added one by one: no full extra copy)."""
        try:
            import faiss
        except ImportError:
            raise ImportError("faiss is missing: install the 'cpu' extra (faiss-cpu) or the 'gpu' extra (faiss-gpu)") from None
        blocks = [doc_embeddings] if isinstance(doc_embeddings, np.ndarray) else doc_embeddings
        self.index = None
        for block in blocks:
            block = np.ascontiguousarray(block, dtype=np.float32)
            if block.ndim != 2:
                raise ValueError(f"document embeddings must be 2-d, got shape {block.shape}")
            if self.index is None:
                self.index = faiss.IndexFlatIP(block.shape[1])
            self.index.add(block)
        if self.index is None or self.index.ntotal != len(doc_ids):
            raise ValueError(f"{len(doc_ids)} document ids but {0 if self.index is None else self.index.ntotal} embeddings")
        self.doc_ids = list(doc_ids)
        self.position = {d: i for i, d in enumerate(self.doc_ids)}
        n, d = self.index.ntotal, self.index.d
        self.vectors = faiss.rev_swig_ptr(self.index.get_xb(), n * d).reshape(n, d)  # a view of faiss' storage

    def __len__(self) -> int:
        return len(self.doc_ids)

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        """Indices ``[B, k]`` of the top-``k`` documents of each query (-1 padded)."""
        _, indices = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(self)))
        return indices

    def exact_scores(self, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Float64 inner products of one query with documents ``rows``: the same value whatever the batch."""
        return (self.vectors[rows].astype(np.float64) * query.astype(np.float64)[None, :]).sum(-1)


def mine_batch(index: DenseIndex, query_ids: list[str], query_embeddings: np.ndarray,
               positives: Mapping[str, list[str]], excluded: Mapping[str, frozenset[str]], config: MiningConfig,
               rescorer: Rescorer | None = None) -> tuple[list[dict[str, Any]], MiningStats]:
    """Mine one batch of queries: their group records (input order) and the filter counts."""
    stats = MiningStats()
    indices = index.search(query_embeddings, config.depth)
    per_query = []
    for qid, query, row in zip(query_ids, query_embeddings, indices):
        row = row[row >= 0]
        scores = index.exact_scores(query, row)
        order = sorted(range(len(row)), key=lambda j: (-scores[j], int(row[j])))  # exact score, then corpus order
        candidates = [Candidate(index.doc_ids[row[j]], rank, float(scores[j])) for rank, j in enumerate(order, start=1)]
        pos_rows = np.array([index.position[d] for d in positives[qid]], dtype=np.int64)
        pos_scores = [float(s) for s in index.exact_scores(query, pos_rows)]
        per_query.append((qid, candidates, pos_scores))

    teacher: dict[tuple[str, str], float] = {}
    if rescorer is not None:
        # teacher scores for all survivors of filters 1-5 of the whole batch, in one call, plus every positive
        pending: dict[str, list[Candidate]] = {}
        probe = MiningStats()
        for qid, candidates, pos_scores in per_query:
            capped = MiningConfig(**{**asdict(config), "num_negatives": None, "max_rescore_score": None})
            pending[qid] = select_negatives(candidates, excluded[qid], min(pos_scores), capped, probe)
        ids = list(pending)
        docs = [positives[q] + [c.doc_id for c in pending[q]] for q in ids]
        for qid, doc_ids, scores in zip(ids, docs, rescorer(ids, docs)):
            if len(scores) != len(doc_ids):
                raise ValueError(f"rescorer returned {len(scores)} scores for {len(doc_ids)} documents of query '{qid}'")
            teacher.update({(qid, d): float(s) for d, s in zip(doc_ids, scores)})

    records = []
    for qid, candidates, pos_scores in per_query:
        def fill(kept: list[Candidate], qid: str = qid) -> None:
            for cand in kept:
                cand.teacher = teacher[(qid, cand.doc_id)]
        kept = select_negatives(candidates, excluded[qid], min(pos_scores), config, stats,
                                rescore=fill if rescorer is not None else None)
        record: dict[str, Any] = {
            "query_id": qid, "positives": list(positives[qid]), "negatives": [c.doc_id for c in kept],
            "negative_ranks": [c.rank for c in kept],
            "positive_retriever_scores": pos_scores, "negative_retriever_scores": [c.score for c in kept],
        }
        if rescorer is not None:
            record["positive_scores"] = [teacher[(qid, d)] for d in positives[qid]]
            record["negative_scores"] = [c.teacher for c in kept]
        records.append(record)
    return records, stats


# (query ids, embeddings [B, D] or a function computing them: not called for a batch resumed from progress)
QueryBatches = Iterable[tuple[list[str], "np.ndarray | Callable[[], np.ndarray]"]]


def mine(index: DenseIndex, query_batches: QueryBatches, positives: Mapping[str, list[str]],
         excluded: Mapping[str, frozenset[str]], config: MiningConfig, out: str | Path | None = None,
         rescorer: Rescorer | None = None, progress_dir: str | Path | None = None,
         on_batch: Callable[[int, MiningStats], None] | None = None) -> MiningStats:
    """Mine every batch of ``query_batches`` (see :data:`QueryBatches`); write ``out`` atomically.

    With ``progress_dir``, each batch's records go to ``progress_dir/batch-NNNNNN.jsonl`` (atomically) as it finishes
    and batches already there are skipped, so a rerun with the same inputs resumes; the folder is removed at the end.
    Records stream to disk: memory holds one batch.
    """
    progress = Path(progress_dir) if progress_dir is not None else None
    if progress is not None:
        progress.mkdir(parents=True, exist_ok=True)
    total = MiningStats()
    with _maybe_atomic(out) as handle:
        for number, (query_ids, embeddings) in enumerate(query_batches):
            part = progress / f"batch-{number:06d}.jsonl" if progress is not None else None
            if part is not None and part.is_file() and (done := part.with_suffix(".stats.json")).is_file():
                stats = MiningStats.from_dict(json.loads(done.read_text()))
                records = None
            else:
                if callable(embeddings):
                    embeddings = embeddings()
                records, stats = mine_batch(index, query_ids, np.asarray(embeddings, dtype=np.float32), positives,
                                            excluded, config, rescorer)
                if part is not None:
                    write_jsonl(part, records)
                    write_json(part.with_suffix(".stats.json"), stats.to_dict())
            if handle is not None:
                if records is None:
                    handle.write(part.read_text(encoding="utf-8"))
                else:
                    handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            total.add(stats)
            if on_batch is not None:
                on_batch(number, total)
    if progress is not None and out is not None:
        shutil.rmtree(progress, ignore_errors=True)
    return total


class _maybe_atomic:
    """``atomic_write(path)`` when a path is given, else a context yielding ``None``."""

    def __init__(self, path: str | Path | None) -> None:
        self._cm = atomic_write(path) if path is not None else None

    def __enter__(self):
        return self._cm.__enter__() if self._cm is not None else None

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc) if self._cm is not None else False


def fingerprint(**parts: Any) -> str:
    """A short hash of the settings a progress folder belongs to."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_progress(progress_dir: Path, key: str) -> None:
    """Keep ``progress_dir`` when it belongs to the same settings (``key``), else start it afresh."""
    marker = progress_dir / "settings.json"
    if progress_dir.is_dir() and (not marker.is_file() or json.loads(marker.read_text()).get("key") != key):
        shutil.rmtree(progress_dir)
    progress_dir.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        write_json(marker, {"key": key})


# ---------------------------------------------------------------- teacher scores for pairs and groups
PairScore = Callable[[list[str], list[str]], list[float]]  # (query ids, doc ids) -> scores


def read_score_input(path: str | Path) -> tuple[str, list[tuple[int, dict[str, Any]]]]:
    """``("pairs" | "groups", records)``: pairs have ``query_id`` + ``doc_id``, groups ``query_id`` + ``positives``."""
    records = list(iter_jsonl(path))
    if not records:
        raise DataFormatError(path, None, None, "no records")
    kinds = set()
    for line, record in records:
        if "query_id" not in record:
            raise DataFormatError(path, line, "query_id", "missing")
        if "doc_id" in record:
            kinds.add("pairs")
        elif "positives" in record or "negatives" in record:
            kinds.add("groups")
        else:
            raise DataFormatError(path, line, None, "neither a pair (query_id, doc_id) nor a group (query_id, positives, negatives)")
    if len(kinds) > 1:
        raise DataFormatError(path, None, None, "mixes pairs (doc_id) and groups (positives/negatives)")
    return kinds.pop(), records


def score_records(kind: str, records: list[tuple[int, dict[str, Any]]], score: PairScore, path: str | Path = "<pairs>",
                  chunk: int = 8192) -> Iterator[dict[str, Any]]:
    """Records with teacher scores: pairs get ``score``; groups get ``positive_scores`` and ``negative_scores``.

    Pairs are scored ``chunk`` at a time (groups: whole groups up to about ``chunk`` pairs), records stream out in order.
    """
    def flat(record: dict[str, Any], line: int) -> list[tuple[str, str]]:
        qid = str(record["query_id"])
        if kind == "pairs":
            return [(qid, str(record["doc_id"]))]
        docs = []
        for name in ("positives", "negatives"):
            ids = record.get(name, [])
            if not isinstance(ids, list):
                raise DataFormatError(path, line, name, f"expected list, got {type(ids).__name__}")
            docs += [(qid, str(d)) for d in ids]
        return docs

    pending: list[tuple[dict[str, Any], list[tuple[str, str]]]] = []

    def flush() -> Iterator[dict[str, Any]]:
        pairs = [p for _, ps in pending for p in ps]
        scores = [float(s) for s in score([q for q, _ in pairs], [d for _, d in pairs])] if pairs else []
        if len(scores) != len(pairs):
            raise ValueError(f"scorer returned {len(scores)} scores for {len(pairs)} pairs")
        if not all(math.isfinite(s) for s in scores):
            raise ValueError("scorer returned non-finite scores")
        at = 0
        for record, ps in pending:
            out = dict(record)
            if kind == "pairs":
                out["score"] = scores[at]
            else:
                n_pos = len(record.get("positives", []))
                out["positive_scores"] = scores[at:at + n_pos]
                out["negative_scores"] = scores[at + n_pos:at + len(ps)]
            at += len(ps)
            yield out
        pending.clear()

    size = 0
    for line, record in records:
        ps = flat(record, line)
        pending.append((record, ps))
        size += len(ps)
        if size >= chunk:
            yield from flush()
            size = 0
    yield from flush()


# ---------------------------------------------------------------- a run (evaluation output) as training groups
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
