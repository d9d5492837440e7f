"""BEIR-format datasets: ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv``.

A dataset is named by a folder path or by a name looked up under the data root
(``$RESEARCH_DATA_DIR``, default ``~/.cache/research/datasets``). A missing BEIR dataset is
downloaded from the official BEIR zip when the network allows (``$RESEARCH_BEIR_URL`` overrides the
base address, e.g. for a mirror). Document text is ``title + " " + text``, as BEIR and MTEB build it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

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
    corpus: dict[str, Document]
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
    if download and name in BEIR_DATASETS:
        return download_beir(name, root)
    raise ResearchError(
        f"dataset '{name}' not found: not a folder, and not under the data root {root} "
        f"(set RESEARCH_DATA_DIR{'; BEIR names download automatically when online' if name not in BEIR_DATASETS else ''})"
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


def load_corpus(path: str | Path) -> dict[str, Document]:
    corpus: dict[str, Document] = {}
    for line, record in iter_jsonl(path):
        doc_id = _read_id(record, path, line)
        if doc_id in corpus:
            raise DataFormatError(path, line, "_id", f"duplicate id '{doc_id}'")
        title = record.get("title")
        title = "" if title is None else title  # absent or null; any other non-string (0, [], false) is an error
        if not isinstance(title, str):
            raise DataFormatError(path, line, "title", f"expected string, got {type(title).__name__}")
        text = require_field(record, "text", str, path, line, allow_empty=True)
        if not (title.strip() or text.strip()):
            raise DataFormatError(path, line, "text", "empty (and no title)")
        corpus[doc_id] = Document(title=title.strip(), text=text.strip())
    if not corpus:
        raise DataFormatError(path, None, None, "no documents")
    return corpus


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


def load_dataset(name_or_path: str | Path, split: str | None = "test") -> RetrievalDataset:
    """Load and validate corpus, queries and (if ``split``) its qrels; nothing is returned half-loaded."""
    path = resolve_dataset(name_or_path)
    corpus = load_corpus(path / "corpus.jsonl")
    queries = load_queries(path / "queries.jsonl")
    qrels: Qrels = {}
    if split is not None:
        qrels_path = path / "qrels" / f"{split}.tsv"
        if not qrels_path.is_file():
            available = sorted(p.stem for p in (path / "qrels").glob("*.tsv"))
            raise ResearchError(f"{qrels_path}: no qrels for split '{split}' (available: {', '.join(available) or 'none'})")
        qrels = load_qrels(qrels_path, queries, corpus)
    return RetrievalDataset(name=path.name, path=path, corpus=corpus, queries=queries, qrels=qrels, split=split)


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
