"""MS MARCO passage files: collection, queries, qrels and training triples, validated, and a RetrievalDataset from them.

Formats (UTF-8, one record a line, blank lines skipped, a BOM and CRLF accepted):

* collection ``collection.tsv``: ``pid<TAB>passage text``
* queries ``queries.*.tsv`` (and Anserini ``topics.msmarco-passage.*.txt``): ``qid<TAB>query text``
* qrels ``qrels.*.tsv`` / TREC: ``qid 0 pid relevance`` (whitespace-separated; :func:`research.data.trec.read_trec_qrels`)
* triples by text ``triples.train.small.tsv``: ``query<TAB>positive passage<TAB>negative passage``
* triples by id ``qidpidtriples.train.full.tsv``: ``qid<TAB>positive pid<TAB>negative pid``

Every malformed record raises :class:`DataFormatError` naming the file, the line and the field: a wrong number of
tab-separated columns, an empty text, a duplicate id, or (with ``int_ids=True``, the MS MARCO default) an id that is
not a non-negative integer. Ids are kept as the strings written in the file.

:func:`build_dataset` turns collection + queries + qrels into a :class:`research.data.beir.RetrievalDataset` (every
qrels id checked), so BM25, dense evaluation and the metrics work unchanged; :func:`write_beir` writes it as a BEIR
folder that ``research fit``/``evaluate``/``bm25`` read (``--data DIR``); :func:`triples_to_beir` does the same for
text triples (ids are assigned to distinct texts; the negatives go to a groups JSONL for ``groups_file``)::

    python -m research.data.msmarco --collection collection.tsv --queries queries.dev.small.tsv \\
        --qrels qrels.dev.small.tsv --split dev --out data/msmarco-dev

The full passage task needs no conversion: the named datasets ``msmarco-passage`` (``--split train|dev|dev-small|
eval|trec-dl-2019``), ``msmarco-passage/dev-small`` and ``msmarco-passage/trec-dl-2019`` read the official files
under the data root (downloaded when missing, :mod:`research.data.msmarco_files`), the 8.8M-passage collection through
its byte-offset index (:func:`open_collection`). The official dev.small measure, MRR@10, is this framework's ``RR@10``
(tests/test_msmarco_full.py checks it against a port of the official ``ms_marco_eval.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from research.data.beir import Document, RetrievalDataset, open_corpus
from research.data.msmarco_files import check_id, fields, line_of, read_id_text, read_qrels, read_queries
from research.data.trec import Qrels
from research.errors import DataFormatError
from research.io import atomic_write, iter_lines

__all__ = [
    "read_collection", "open_collection", "read_queries", "read_qrels", "read_triples_text", "read_triples_ids",
    "TextTriple", "IdTriple", "build_dataset", "load_msmarco", "write_beir", "triples_to_beir", "id_triples_to_groups",
]


@dataclass(frozen=True)
class TextTriple:
    query: str
    positive: str
    negative: str


@dataclass(frozen=True)
class IdTriple:
    query_id: str
    positive_id: str
    negative_id: str


def read_collection(path: str | Path, int_ids: bool = True) -> dict[str, str]:
    """``pid<TAB>text`` lines -> ``{pid: text}`` (a dict: for small collections; see :func:`open_collection`)."""
    return read_id_text(path, ("pid", "text"), int_ids, "passages")


def open_collection(path: str | Path):
    """``collection.tsv`` (integer pids) as an :class:`~research.data.offsets.OffsetCorpus` of
    :class:`~research.data.beir.Document`: validated once, read by byte offset, no dict (the full 8.8M passages)."""
    return open_corpus(path)


def iter_triples_text(path: str | Path) -> Iterator[tuple[int, TextTriple]]:
    """``(line, TextTriple)`` for each ``query<TAB>positive<TAB>negative`` line (streaming: the file may be large)."""
    path = Path(path)
    for number, line in iter_lines(path):
        query, positive, negative = fields(path, number, line, ("query", "positive", "negative"))
        yield number, TextTriple(query, positive, negative)


def read_triples_text(path: str | Path, limit: int | None = None) -> list[TextTriple]:
    """Triples by text; ``limit`` keeps the first ``limit`` triples."""
    triples = []
    for _, triple in iter_triples_text(path):
        if limit is not None and len(triples) >= limit:
            break
        triples.append(triple)
    if not triples:
        raise DataFormatError(path, None, None, "no triples")
    return triples


def read_triples_ids(path: str | Path, queries: Mapping[str, str] | None = None,
                     collection: Mapping[str, object] | None = None, int_ids: bool = True,
                     limit: int | None = None) -> list[IdTriple]:
    """``qid<TAB>pos_pid<TAB>neg_pid`` lines; ids checked against ``queries``/``collection`` when given.

    A triple repeated exactly is a duplicate (error); a positive equal to its negative is an error too.
    """
    path = Path(path)
    triples: list[IdTriple] = []
    seen: set[tuple[str, str, str]] = set()
    names = ("qid", "pos_pid", "neg_pid")
    for number, line in iter_lines(path):
        if limit is not None and len(triples) >= limit:
            break
        values = fields(path, number, line, names)
        for name, value in zip(names, values):
            check_id(path, number, name, value, int_ids)
        qid, pos, neg = values
        if queries is not None and qid not in queries:
            raise DataFormatError(path, number, "qid", f"unknown query '{qid}'")
        if collection is not None:
            for name, value in (("pos_pid", pos), ("neg_pid", neg)):
                if value not in collection:
                    raise DataFormatError(path, number, name, f"unknown passage '{value}'")
        if pos == neg:
            raise DataFormatError(path, number, "neg_pid", f"negative equals the positive '{pos}'")
        if (qid, pos, neg) in seen:
            raise DataFormatError(path, number, None, f"duplicate triple ({qid}, {pos}, {neg})")
        seen.add((qid, pos, neg))
        triples.append(IdTriple(qid, pos, neg))
    if not triples:
        raise DataFormatError(path, None, None, "no triples")
    return triples


# ---------------------------------------------------------------- into the framework's dataset
def build_dataset(collection: Mapping[str, str], queries: Mapping[str, str], qrels: Qrels, name: str = "msmarco",
                  split: str | None = "dev", path: str | Path | None = None,
                  qrels_path: str | Path | None = None) -> RetrievalDataset:
    """A :class:`RetrievalDataset` (passages without titles) whose every qrels query and passage id is known.

    ``qrels_path`` is only used to name the file in an error.
    """
    where = Path(qrels_path or "qrels")
    for qid, docs in qrels.items():
        if qid not in queries:
            raise DataFormatError(where, line_of(where, 0, qid) if qrels_path else None, "query_id",
                                  f"unknown query '{qid}'")
        for pid in docs:
            if pid not in collection:
                raise DataFormatError(where, line_of(where, 2, pid) if qrels_path else None, "doc_id",
                                      f"unknown passage '{pid}'")
    corpus = {pid: Document(title="", text=text) for pid, text in collection.items()}
    return RetrievalDataset(name=name, path=Path(path or "."), corpus=corpus, queries=dict(queries), qrels=qrels,
                            split=split)


def load_msmarco(collection: str | Path, queries: str | Path, qrels: str | Path | None = None, split: str = "dev",
                 name: str = "msmarco", int_ids: bool = True) -> RetrievalDataset:
    """Read and validate the three files into a :class:`RetrievalDataset` (``qrels=None``: no judgments)."""
    passages = read_collection(collection, int_ids)
    topics = read_queries(queries, int_ids)
    judgments = read_qrels(qrels, int_ids) if qrels is not None else {}
    return build_dataset(passages, topics, judgments, name=name, split=split if qrels is not None else None,
                         path=Path(collection).parent, qrels_path=qrels)


def write_beir(dataset: RetrievalDataset, out_dir: str | Path, split: str | None = None) -> Path:
    """Write ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv`` (atomically) for ``--data out_dir``."""
    out_dir = Path(out_dir)
    split = split or dataset.split or "test"
    with atomic_write(out_dir / "corpus.jsonl") as handle:
        for doc_id, doc in dataset.corpus.items():
            handle.write(json.dumps({"_id": doc_id, "title": doc.title, "text": doc.text}, ensure_ascii=False) + "\n")
    with atomic_write(out_dir / "queries.jsonl") as handle:
        for qid, text in dataset.queries.items():
            handle.write(json.dumps({"_id": qid, "text": text}, ensure_ascii=False) + "\n")
    if dataset.qrels:
        with atomic_write(out_dir / "qrels" / f"{split}.tsv") as handle:
            handle.write("query-id\tcorpus-id\tscore\n")
            for qid, docs in dataset.qrels.items():
                for pid, grade in docs.items():
                    handle.write(f"{qid}\t{pid}\t{grade}\n")
    return out_dir


def _text_id(prefix: str, text: str) -> str:
    return prefix + hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def triples_to_beir(triples: list[TextTriple], out_dir: str | Path, split: str = "train") -> Path:
    """Text triples -> a BEIR folder (ids ``q<sha1>``/``p<sha1>`` of the texts) + ``groups.jsonl`` of negatives.

    Train with ``data: {data: OUT, train_split: train, eval_split: null, groups_file: OUT/groups.jsonl,
    num_negatives: 1}``.
    """
    out_dir = Path(out_dir)
    queries: dict[str, str] = {}
    corpus: dict[str, Document] = {}
    qrels: Qrels = {}
    negatives: dict[str, list[str]] = {}
    for triple in triples:
        qid = _text_id("q", triple.query)
        pos, neg = _text_id("p", triple.positive), _text_id("p", triple.negative)
        queries[qid] = triple.query
        corpus.setdefault(pos, Document("", triple.positive))
        corpus.setdefault(neg, Document("", triple.negative))
        qrels.setdefault(qid, {})[pos] = 1
        if neg not in negatives.setdefault(qid, []):
            negatives[qid].append(neg)
    write_beir(RetrievalDataset("triples", out_dir, corpus, queries, qrels, split), out_dir, split)
    with atomic_write(out_dir / "groups.jsonl") as handle:
        for qid, negs in negatives.items():
            negs = [n for n in negs if n not in qrels[qid]]
            handle.write(json.dumps({"query_id": qid, "positives": sorted(qrels[qid]), "negatives": negs}) + "\n")
    return out_dir


def id_triples_to_groups(triples: list[IdTriple], path: str | Path) -> int:
    """Id triples -> groups JSONL (positives and negatives per query) for ``RetrievalDataModule(groups_file=...)``."""
    groups: dict[str, tuple[list[str], list[str]]] = {}
    for triple in triples:
        positives, negatives = groups.setdefault(triple.query_id, ([], []))
        if triple.positive_id not in positives:
            positives.append(triple.positive_id)
        if triple.negative_id not in negatives:
            negatives.append(triple.negative_id)
    with atomic_write(path) as handle:
        for qid, (positives, negatives) in groups.items():
            negatives = [n for n in negatives if n not in positives]
            handle.write(json.dumps({"query_id": qid, "positives": positives, "negatives": negatives}) + "\n")
    return len(groups)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m research.data.msmarco",
                                     description="MS MARCO TSV files -> a validated BEIR folder")
    parser.add_argument("--collection", required=True)
    parser.add_argument("--queries", required=True)
    parser.add_argument("--qrels", default=None)
    parser.add_argument("--split", default="dev")
    parser.add_argument("--out", required=True)
    parser.add_argument("--string-ids", action="store_true", help="accept non-integer ids")
    args = parser.parse_args(argv)
    dataset = load_msmarco(args.collection, args.queries, args.qrels, args.split, int_ids=not args.string_ids)
    write_beir(dataset, args.out, args.split)
    print(f"wrote {args.out}: {len(dataset.corpus)} passages, {len(dataset.queries)} queries, "
          f"{sum(map(len, dataset.qrels.values()))} qrels ({args.split})")


if __name__ == "__main__":
    import sys

    from research.errors import run_tool

    sys.exit(run_tool(main))  # a malformed file: one line naming file, line and field; exit code 2
