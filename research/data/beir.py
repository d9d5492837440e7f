"""BEIR-format datasets: ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv``.

A dataset is named by a folder path or by a name looked up under the data root
(``$RESEARCH_DATA_DIR``, default ``~/.cache/research/datasets``). A missing BEIR dataset is
downloaded from the official BEIR zip when the network allows (``$RESEARCH_BEIR_URL`` overrides the
base address, e.g. for a mirror). Document text is ``title + " " + text``, as BEIR and MTEB build it.

``load_dataset(..., lazy_corpus=True)`` reads ``corpus.jsonl`` through a byte-offset index
(:class:`research.data.offsets.OffsetCorpus`: a mapping that holds no text) instead of a dict. A folder holding
MS MARCO's ``collection.tsv`` (the named ``msmarco-passage`` and ``msmarco-passage/<split>``,
:mod:`research.data.msmarco_files`) is read that way always: its queries and qrels are TSV/TREC files by split.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from research.data import msmarco_files as marco
from research.data.offsets import OffsetCorpus
from research.data.trec import Qrels, read_tsv_qrels
from research.errors import DataFormatError, ResearchError
from research.io import iter_jsonl, iter_lines, require_field

BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets"
BEIR_DATASETS = frozenset({
    "msmarco", "trec-covid", "nfcorpus", "nq", "hotpotqa", "fiqa", "arguana", "webis-touche2020",
    "cqadupstack", "quora", "dbpedia-entity", "scidocs", "fever", "climate-fever", "scifact",
})


@dataclass(frozen=True)
class Document:
    title: str
    text: str

    @property
    def full_text(self) -> str:
        """The text a model reads: title and body joined by a space (BEIR / MTEB convention)."""
        return f"{self.title} {self.text}".strip() if self.title else self.text


@dataclass
class RetrievalDataset:
    """One split of a BEIR-format dataset, fully validated."""

    name: str
    path: Path
    corpus: Mapping[str, Document]  # a dict, or an OffsetCorpus (lazy_corpus, MS MARCO)
    queries: dict[str, str]
    qrels: Qrels
    split: str | None = None
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def judged_queries(self) -> dict[str, str]:
        """Queries that have at least one qrels row in this split, in file order of queries.jsonl."""
        return {qid: text for qid, text in self.queries.items() if qid in self.qrels}


def data_root() -> Path:
    return Path(os.environ.get("RESEARCH_DATA_DIR") or Path.home() / ".cache" / "research" / "datasets").expanduser()


def resolve_dataset(name_or_path: str | Path, *, download: bool = True) -> Path:
    """A dataset folder from a path, or a name under the data root (downloading a BEIR dataset if missing)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    root = data_root()
    candidate = root / str(name_or_path)
    if candidate.is_dir():
        return candidate
    name = str(name_or_path)
    if marco.named_subset(name) is not None and ((root / marco.NAME).is_dir() or download):
        marco.split_files(root / marco.NAME, None, download)  # the collection (and queries) when missing
        return root / marco.NAME
    if download and name in BEIR_DATASETS:
        return download_beir(name, root)
    import difflib

    present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if root.is_dir() else []
    holds = f"which holds {', '.join(present)}" if present else "which has no dataset folders" if root.is_dir() \
        else "which does not exist"
    close = difflib.get_close_matches(name, [*present, *sorted(BEIR_DATASETS - set(present))], n=1, cutoff=0.6)
    raise ResearchError(
        f"dataset '{name}' not found: not a folder, and not under the data root {root} ({holds})"
        + (f"; did you mean '{close[0]}'?" if close else "")
        + f" (set RESEARCH_DATA_DIR{'; BEIR names download automatically when online' if name not in BEIR_DATASETS else ''})"
    )


def download_beir(name: str, root: Path) -> Path:
    """Download and unpack ``<name>.zip`` from the BEIR address into ``root/<name>``, atomically."""
    base = os.environ.get("RESEARCH_BEIR_URL", BEIR_URL).rstrip("/")
    url = f"{base}/{name}.zip"
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}.") as tmp:
        archive = Path(tmp) / f"{name}.zip"
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as out:
                shutil.copyfileobj(response, out)
        except (urllib.error.URLError, OSError) as err:
            raise ResearchError(
                f"dataset '{name}' is not under {root} and downloading {url} failed ({err}); "
                f"put the BEIR folder there or set RESEARCH_DATA_DIR"
            ) from None
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(Path(tmp) / "unpacked")
        except (zipfile.BadZipFile, OSError) as err:
            raise ResearchError(f"{url}: not a readable zip archive ({err})") from None
        unpacked = Path(tmp) / "unpacked"
        inner = unpacked / name if (unpacked / name).is_dir() else unpacked
        if not (inner / "corpus.jsonl").is_file():
            raise ResearchError(f"{url}: archive has no {name}/corpus.jsonl")
        target = root / name
        try:
            os.replace(inner, target)
        except OSError:  # another process (e.g. another DDP rank) unpacked it first
            if not (target / "corpus.jsonl").is_file():
                raise
    return target


def _document(record: dict, path: str | Path, line: int) -> tuple[str, Document]:
    doc_id = _read_id(record, path, line)
    title = record.get("title")
    title = "" if title is None else title  # absent or null; any other non-string (0, [], false) is an error
    if not isinstance(title, str):
        raise DataFormatError(path, line, "title", f"expected string, got {type(title).__name__}")
    text = require_field(record, "text", str, path, line, allow_empty=True)
    if not (title.strip() or text.strip()):
        raise DataFormatError(path, line, "text", "empty (and no title)")
    return doc_id, Document(title=title.strip(), text=text.strip())


def load_corpus(path: str | Path) -> dict[str, Document]:
    corpus: dict[str, Document] = {}
    for line, record in iter_jsonl(path):
        doc_id, document = _document(record, path, line)
        if doc_id in corpus:
            raise DataFormatError(path, line, "_id", f"duplicate id '{doc_id}'")
        corpus[doc_id] = document
    if not corpus:
        raise DataFormatError(path, None, None, "no documents")
    return corpus


def parse_corpus_line(path: Path, number: int, text: str) -> tuple[str, Document]:
    """One ``corpus.jsonl`` line -> ``(id, Document)``, validated as :func:`load_corpus` validates it."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFormatError(path, number, None, f"invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise DataFormatError(path, number, None, f"expected a JSON object, got {type(record).__name__}")
    return _document(record, path, number)


def parse_passage_line(path: Path, number: int, text: str) -> tuple[str, Document]:
    """One MS MARCO ``collection.tsv`` line (``pid<TAB>text``) -> ``(pid, Document)`` without title."""
    pid, passage = marco.parse_id_text(path, number, text)
    return pid, Document(title="", text=passage)


def open_corpus(path: str | Path) -> OffsetCorpus[Document]:
    """``corpus.jsonl`` or ``collection.tsv`` as a :class:`OffsetCorpus` of :class:`Document` (validated once)."""
    path = Path(path)
    if path.suffix == ".tsv":
        return OffsetCorpus(path, parse_passage_line, "msmarco-collection", id_field="pid")
    return OffsetCorpus(path, parse_corpus_line, "beir-corpus", id_field="_id")


def load_queries(path: str | Path) -> dict[str, str]:
    queries: dict[str, str] = {}
    for line, record in iter_jsonl(path):
        query_id = _read_id(record, path, line)
        if query_id in queries:
            raise DataFormatError(path, line, "_id", f"duplicate id '{query_id}'")
        queries[query_id] = require_field(record, "text", str, path, line).strip()
    if not queries:
        raise DataFormatError(path, None, None, "no queries")
    return queries


def load_qrels(path: str | Path, queries: dict[str, str], corpus: dict[str, Document]) -> Qrels:
    """Qrels of one split, every query and document id checked against the loaded files."""
    qrels = read_tsv_qrels(path)
    if not qrels:
        raise DataFormatError(path, None, None, "no qrels")
    for query_id, docs in qrels.items():
        if query_id not in queries:
            raise DataFormatError(path, _find_line(path, 0, query_id), "query-id", f"unknown query '{query_id}'")
        for doc_id in docs:
            if doc_id not in corpus:
                raise DataFormatError(path, _find_line(path, 1, doc_id), "corpus-id", f"unknown document '{doc_id}'")
    return qrels


def load_dataset(name_or_path: str | Path, split: str | None = "test", lazy_corpus: bool = False) -> RetrievalDataset:
    """Load and validate corpus, queries and (if ``split``) its qrels; nothing is returned half-loaded.

    ``lazy_corpus``: the corpus is an :class:`OffsetCorpus` (always so for an MS MARCO folder)."""
    named = marco.named_subset(str(name_or_path))
    if named is not None and named[1] is not None:
        split = marco.subset_split(str(name_or_path), named[1], split)
    path = resolve_dataset(name_or_path)
    if named is not None or marco.is_msmarco_folder(path):
        return _load_msmarco_folder(path, split)
    corpus = open_corpus(path / "corpus.jsonl") if lazy_corpus else load_corpus(path / "corpus.jsonl")
    queries = load_queries(path / "queries.jsonl")
    qrels: Qrels = {}
    if split is not None:
        qrels_path = path / "qrels" / f"{split}.tsv"
        if not qrels_path.is_file():
            available = sorted(p.stem for p in (path / "qrels").glob("*.tsv"))
            raise ResearchError(f"{qrels_path}: no qrels for split '{split}' (available: {', '.join(available) or 'none'})")
        qrels = load_qrels(qrels_path, queries, corpus)
    return RetrievalDataset(name=path.name, path=path, corpus=corpus, queries=queries, qrels=qrels, split=split)


def _load_msmarco_folder(path: Path, split: str | None) -> RetrievalDataset:
    """An MS MARCO passage folder (:mod:`research.data.msmarco_files`): the collection through its offset index,
    the split's queries, and its qrels with every id checked against both."""
    collection, queries_file, qrels_file = marco.split_files(path, split)
    corpus = open_corpus(collection)
    queries = marco.read_queries(queries_file) if queries_file is not None else {}
    qrels: Qrels = marco.read_qrels(qrels_file) if qrels_file is not None else {}
    for query_id, docs in qrels.items():
        if query_id not in queries:
            raise DataFormatError(qrels_file, marco.line_of(qrels_file, 0, query_id), "query_id",
                                  f"unknown query '{query_id}'")
        for doc_id in docs:
            if doc_id not in corpus:
                raise DataFormatError(qrels_file, marco.line_of(qrels_file, 2, doc_id), "doc_id",
                                      f"unknown passage '{doc_id}'")
    name = marco.NAME if path.name == marco.NAME else path.name
    return RetrievalDataset(name=name, path=path, corpus=corpus, queries=queries, qrels=qrels, split=split)


def _read_id(record: dict, path: str | Path, line: int) -> str:
    if "_id" not in record:
        raise DataFormatError(path, line, "_id", "missing")
    value = record["_id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataFormatError(path, line, "_id", f"expected string, got {type(value).__name__}")
    value = str(value).strip()
    if not value:
        raise DataFormatError(path, line, "_id", "empty")
    return value


def _find_line(path: str | Path, column: int, value: str) -> int | None:
    for line, text in iter_lines(path):
        parts = text.split("\t")
        if len(parts) > column and parts[column].strip() == value:
            return line
    return None
