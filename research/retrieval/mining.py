"""Hard-negative mining with a dense retriever: training groups for :mod:`research.data.groups`.

Mining encodes the corpus once, shard by shard into an index directory (:mod:`research.retrieval.index`, the same
encoder and shards as ``research index``), into an exact ``faiss.IndexFlatIP`` (:class:`research.retrieval.dense.DenseIndex`) and
searches it in QUERY BATCHES, so memory is the index plus one batch (``query_batch × depth`` candidates): never a
query × corpus matrix, whatever the number of queries. For each query, candidates are the retriever's top ``depth``
documents, filtered into negatives as :mod:`research.retrieval.negatives` describes. Retriever scores are recomputed
exactly, in float64 per (query, document) pair from the stored float32 vectors, so that the output does not depend on
the query batch size (faiss' BLAS path does).

Output records (one per query with at least one positive; JSONL that ``RetrievalDataModule(groups_file=...)`` reads)::

    {"query_id", "positives", "negatives", "negative_ranks",
     "positive_retriever_scores", "negative_retriever_scores",
     "positive_scores", "negative_scores"}          # the last two: teacher (rescorer) scores, only with a rescorer

The output file is written atomically; with ``progress_dir`` each finished query batch (and each corpus shard)
is kept there, so an interrupted run resumes where it stopped. :func:`mine` works on an index and query embeddings;
:func:`mine_dataset` is ``research mine``: a dataset, a bi-encoder and an optional rescorer, from loading to output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from research.data.beir import RetrievalDataset
from research.errors import ResearchError
from research.io import atomic_write, write_json, write_jsonl
from research.models.bi_encoder import BiEncoder
from research.models.runtime import inference_autocast
from research.models.scorers import ScorerOptions, load_scorer
from research.progress import stage
from research.retrieval.dense import DenseIndex
from research.retrieval.index.encode import (
    ShardBatches,
    corpus_digest,
    document_embedder,
    encode_missing,
    prepare_directory,
)
from research.retrieval.index.manifest import IndexManifest, weights_digest
from research.retrieval.index.search import ShardedIndex
from research.retrieval.negatives import (
    Candidate,
    MiningConfig,
    MiningStats,
    positives_and_excluded,
    select_negatives,
)
from research.retrieval.teacher_scores import PairScore, pair_score

# (query ids, document ids per query) -> teacher scores per query, aligned with the document ids
Rescorer = Callable[[list[str], list[list[str]]], list[list[float]]]


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


def settings_key(**parts: Any) -> str:
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


def rescorer_from(score: PairScore) -> Rescorer:
    """A :data:`Rescorer` that scores all of a batch's (query, document) pairs in one ``score`` call."""
    def rescorer(query_ids: list[str], docs: list[list[str]]) -> list[list[float]]:
        flat_q = [q for q, ds in zip(query_ids, docs) for _ in ds]
        flat_d = [d for ds in docs for d in ds]
        if not flat_q:
            return [[] for _ in query_ids]
        scores = score(flat_q, flat_d)
        out, at = [], 0
        for ds in docs:
            out.append(scores[at:at + len(ds)])
            at += len(ds)
        return out
    return rescorer


@dataclass(frozen=True)
class MiningModels:
    """The retriever (a bi-encoder) and optional rescorer (any scoring model) of :func:`mine_dataset`, and how they run.

    ``max_length`` overrides both models' max length; ``batch_size`` is the encoding batch, ``rescore_batch_size`` the
    rescorer's.
    """

    retriever: str | Path
    rescorer: str | Path | None = None
    max_length: int | None = None
    trust_remote_code: bool = False
    precision: str = "32-true"
    device: str = "cpu"
    batch_size: int = 128
    rescore_batch_size: int = 32


@dataclass
class MiningRun:
    """What :func:`mine_dataset` did: the filter counts, and the seconds until the corpus was encoded (or resumed)."""

    stats: MiningStats
    corpus_seconds: float


MINING_SHARD_SIZE = 10_000  # corpus rows per shard of the mining index (the unit a resumed run skips)


def _corpus_index(encoder: BiEncoder, data: RetrievalDataset, models: MiningModels, directory: Path | None,
                  report: Callable[[str], None]) -> DenseIndex:
    """The corpus in an exact :class:`DenseIndex`, encoded shard by shard into the index directory ``directory``
    (:mod:`research.retrieval.index`: a resumed run keeps the shards a previous one finished; ``None``: a temporary
    one), then added to faiss one shard at a time."""
    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="research-mine-")))
        config = encoder.config
        manifest = IndexManifest(
            model=str(models.retriever), model_fingerprint=weights_digest(encoder, encoder.tokenizer),
            pooling=config.pooling, normalize=config.normalize, document_prefix=config.document_prefix,
            max_length=config.document_max_length, precision=models.precision, dtype="float32", dim=encoder.dimension,
            count=len(data.corpus), corpus_digest=corpus_digest(data.corpus), shard_size=MINING_SHARD_SIZE,
            batch_size=models.batch_size, device_type=models.device.split(":")[0])
        prepare_directory(directory, manifest, "this mining run")
        shards = ShardBatches(data.corpus, manifest, directory, models.batch_size)
        todo = shards.prepare(0, 1)
        if len(todo) < manifest.num_shards:
            report(f"corpus embeddings: {manifest.num_shards - len(todo)} of {manifest.num_shards} shards resumed "
                   f"from {directory}")
        with inference_autocast(models.precision, models.device):
            encode_missing(shards, document_embedder(encoder))
        index = ShardedIndex(directory)
        return DenseIndex(index.blocks(), index.doc_ids())


def mine_dataset(data: RetrievalDataset, models: MiningModels, config: MiningConfig, out: str | Path,
                 relevance_level: int = 1, query_batch: int = 1024, resume: bool = True,
                 on_batch: Callable[[int, MiningStats], None] | None = None,
                 report: Callable[[str], None] = lambda message: None) -> MiningRun:
    """Mine every query of ``data`` with a positive (grade >= ``relevance_level``) into the groups JSONL ``out``.

    With ``resume``, progress is kept in ``OUT.progress/`` (dropped when the settings change, removed at the end).
    ``report`` receives the messages worth showing a user; ``on_batch`` is :func:`mine`'s.
    """
    started = time.perf_counter()
    positives, excluded = positives_and_excluded(data.qrels, relevance_level)
    query_ids = [qid for qid in data.queries if qid in positives]
    if not query_ids:
        raise ResearchError(f"{data.path}/{data.split}: no query has a positive (relevance >= {relevance_level})")
    doc_ids = list(data.corpus)
    out = Path(out)
    progress = None
    if resume:
        progress = out.with_name(out.name + ".progress")
        prepare_progress(progress, settings_key(model=str(models.retriever), data=str(data.path), split=data.split,
                                                config=config, query_batch=query_batch, rescorer=str(models.rescorer),
                                                relevance_level=relevance_level, max_length=models.max_length,
                                                precision=models.precision, docs=len(doc_ids), queries=len(query_ids)))
    encoder = BiEncoder.from_pretrained(models.retriever, trust_remote_code=models.trust_remote_code,
                                        query_max_length=models.max_length, document_max_length=models.max_length)
    encoder = encoder.to(models.device).eval()
    index = _corpus_index(encoder, data, models, progress / "corpus" if progress is not None else None, report)
    corpus_seconds = time.perf_counter() - started

    def encode(ids: list[str]) -> Callable[[], np.ndarray]:
        def run() -> np.ndarray:
            with inference_autocast(models.precision, models.device):
                return encoder.encode_texts([data.queries[q] for q in ids], is_query=True,
                                            batch_size=models.batch_size).numpy()
        return run

    batches = ((query_ids[s:s + query_batch], encode(query_ids[s:s + query_batch]))
               for s in range(0, len(query_ids), query_batch))
    rescorer = None
    if models.rescorer is not None:
        scorer = load_scorer(models.rescorer, ScorerOptions(max_length=models.max_length,
                                                            trust_remote_code=models.trust_remote_code,
                                                            device=models.device))
        rescorer = rescorer_from(pair_score(scorer, data, models.rescore_batch_size, models.precision, models.device))
    with stage("mining queries", total=len(query_ids), unit="queries") as step:
        def batch_done(number: int, total: MiningStats) -> None:
            step.advance(min(query_batch, len(query_ids) - step.done))
            if on_batch is not None:
                on_batch(number, total)

        stats = mine(index, batches, positives, excluded, config, out=out, rescorer=rescorer, progress_dir=progress,
                     on_batch=batch_done)
    return MiningRun(stats, corpus_seconds)
