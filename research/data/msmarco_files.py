"""MS MARCO passage's files: TSV record readers, the folder layout of the named datasets, and the official downloads.

Below :mod:`research.data.beir` (which loads a ``msmarco-passage`` folder through this module) and
:mod:`research.data.msmarco` (which re-exports the readers). The named datasets live in ``<data root>/msmarco-passage``:

========================  ======================================================  =====================================
split (name)              queries                                                 qrels
========================  ======================================================  =====================================
``train``                 ``queries.train.tsv``                                   ``qrels.train.tsv``
``dev``                   ``queries.dev.tsv``                                     ``qrels.dev.tsv``
``dev-small``             ``queries.dev.small.tsv`` (Anserini: dev-subset)        ``qrels.dev.small.tsv``
``eval`` / ``eval-small``  ``queries.eval.tsv`` / ``queries.eval.small.tsv``       none (hidden)
``trec-dl-2019``          ``msmarco-test2019-queries.tsv`` (Anserini: dl19)       ``2019qrels-pass.txt`` (graded 0-3)
========================  ======================================================  =====================================

``msmarco-passage/<split>`` names one split (``--split`` may then be omitted). The passages are ``collection.tsv``
(8,841,823 lines), read through a byte-offset index (:mod:`research.data.offsets`), never a dict. Missing files are
downloaded from the official locations (``$RESEARCH_MSMARCO_URL`` and ``$RESEARCH_TREC_DL_URL`` override the
hosts, e.g. for a mirror): ``collectionandqueries.tar.gz`` (collection, queries, train and dev.small qrels),
``qrels.dev.tsv``, ``msmarco-test2019-queries.tsv.gz``, NIST's ``2019qrels-pass.txt``, and the training triples
(:func:`triples_path`: ``triples.train.small.tar.gz`` by text, ``qidpidtriples.train.full.2.tsv.gz`` by id). Every
file is renamed into place only once complete, so a crashed or concurrent download never leaves half a file.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from research.data.trec import Qrels, read_trec_qrels
from research.errors import DataFormatError, ResearchError
from research.io import iter_lines

NAME = "msmarco-passage"
MSMARCO_URL = "https://msmarco.z22.web.core.windows.net/msmarcoranking"
TREC_DL_URL = "https://trec.nist.gov/data/deep"
COLLECTION = "collection.tsv"
# split -> (query files, qrels files): the first name of each is the official one, later ones Anserini's
SPLITS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "train": (("queries.train.tsv",), ("qrels.train.tsv",)),
    "dev": (("queries.dev.tsv",), ("qrels.dev.tsv",)),
    "dev-small": (("queries.dev.small.tsv", "topics.msmarco-passage.dev-subset.txt"),
                  ("qrels.dev.small.tsv", "qrels.msmarco-passage.dev-subset.txt")),
    "eval": (("queries.eval.tsv",), ()),
    "eval-small": (("queries.eval.small.tsv",), ()),
    "trec-dl-2019": (("msmarco-test2019-queries.tsv", "topics.dl19-passage.txt"),
                     ("2019qrels-pass.txt", "qrels.dl19-passage.txt")),
}
TRIPLES = {"text": "triples.train.small.tsv", "ids": "qidpidtriples.train.full.2.tsv"}
_TARBALL = "collectionandqueries.tar.gz"
_TARBALL_FILES = {COLLECTION, "queries.train.tsv", "queries.dev.tsv", "queries.dev.small.tsv", "queries.eval.tsv",
                  "queries.eval.small.tsv", "qrels.train.tsv", "qrels.dev.small.tsv"}
# file -> (archive on the MS MARCO host, the files to take from it)
_ARCHIVES = {**{f: (_TARBALL, _TARBALL_FILES) for f in _TARBALL_FILES},
             TRIPLES["text"]: ("triples.train.small.tar.gz", {TRIPLES["text"]}),
             TRIPLES["ids"]: (TRIPLES["ids"] + ".gz", {TRIPLES["ids"]}),
             "msmarco-test2019-queries.tsv": ("msmarco-test2019-queries.tsv.gz", {"msmarco-test2019-queries.tsv"}),
             "qrels.dev.tsv": ("qrels.dev.tsv", {"qrels.dev.tsv"})}
_INT = re.compile(r"[0-9]+")


# ---------------------------------------------------------------- records
def fields(path: Path, number: int, text: str, names: tuple[str, ...]) -> list[str]:
    """The tab-separated, stripped, non-empty columns ``names`` of one line."""
    parts = text.split("\t")
    if len(parts) != len(names):
        raise DataFormatError(path, number, None,
                              f"expected {len(names)} tab-separated columns ({', '.join(names)}), got {len(parts)}")
    values = [part.strip() for part in parts]
    for value, name in zip(values, names):
        if not value:
            raise DataFormatError(path, number, name, "empty")
    return values


def check_id(path: Path, number: int | None, field: str, value: str, int_ids: bool) -> str:
    if int_ids and not _INT.fullmatch(value):
        raise DataFormatError(path, number, field, f"expected a non-negative integer id, got {value!r}")
    if not int_ids and any(c.isspace() for c in value):
        raise DataFormatError(path, number, field, f"id {value!r} contains whitespace")
    return value


def parse_id_text(path: Path, number: int, text: str, names: tuple[str, str] = ("pid", "text"),
                  int_ids: bool = True) -> tuple[str, str]:
    """One ``id<TAB>text`` line, validated."""
    key, value = fields(path, number, text, names)
    return check_id(path, number, names[0], key, int_ids), value


def read_id_text(path: str | Path, names: tuple[str, str], int_ids: bool, what: str) -> dict[str, str]:
    path = Path(path)
    table: dict[str, str] = {}
    for number, line in iter_lines(path):
        key, text = parse_id_text(path, number, line, names, int_ids)
        if key in table:
            raise DataFormatError(path, number, names[0], f"duplicate id '{key}'")
        table[key] = text
    if not table:
        raise DataFormatError(path, None, None, f"no {what}")
    return table


def read_queries(path: str | Path, int_ids: bool = True) -> dict[str, str]:
    """``qid<TAB>text`` lines -> ``{qid: text}``."""
    return read_id_text(path, ("qid", "text"), int_ids, "queries")


def line_of(path: Path, column: int, value: str) -> int | None:
    """The first line whose whitespace-separated ``column`` is ``value`` (to name it in an error)."""
    for number, text in iter_lines(path):
        parts = text.split()
        if len(parts) > column and parts[column] == value:
            return number
    return None


def read_qrels(path: str | Path, int_ids: bool = True) -> Qrels:
    """TREC qrels (``qid iter pid relevance``) via :func:`research.data.trec.read_trec_qrels`, ids checked as integers."""
    path = Path(path)
    qrels = read_trec_qrels(path)
    if int_ids:
        for qid, docs in qrels.items():
            bad = [(field, value) for field, value in [("query_id", qid), *(("doc_id", d) for d in docs)]
                   if not _INT.fullmatch(value)]
            if bad:
                field, value = bad[0]
                raise DataFormatError(path, line_of(path, 0 if field == "query_id" else 2, value), field,
                                      f"expected a non-negative integer id, got {value!r}")
    if not qrels:
        raise DataFormatError(path, None, None, "no qrels")
    return qrels


# ---------------------------------------------------------------- named datasets
def named_subset(name: str) -> tuple[str, str | None] | None:
    """``msmarco-passage`` -> (name, None); ``msmarco-passage/<split>`` -> (name, split); anything else None."""
    if name == NAME:
        return NAME, None
    base, _, subset = name.partition("/")
    if base != NAME or not subset:
        return None
    if subset not in SPLITS:
        raise ResearchError(f"dataset '{name}': unknown MS MARCO split '{subset}' (choose from {', '.join(SPLITS)})")
    return NAME, subset


def subset_split(name: str, subset: str, split: str | None) -> str:
    """The split of ``msmarco-passage/<subset>``: the subset itself; ``split`` may repeat it or be the CLI default
    ``test`` (which the name overrides); any other split is an error."""
    if split not in (None, "test", subset):
        raise ResearchError(f"dataset '{name}' is the '{subset}' split; --split {split} names another one "
                            f"(use --data {NAME} --split {split})")
    return subset


def is_msmarco_folder(folder: Path) -> bool:
    return (folder / COLLECTION).is_file() and not (folder / "corpus.jsonl").is_file()


def _first(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def split_files(folder: Path, split: str | None, download: bool = True) -> tuple[Path, Path | None, Path | None]:
    """(collection, queries, qrels) of ``split`` in ``folder`` (``queries`` None when ``split`` is None), fetching
    missing files from the official locations when ``download``."""
    if split is not None and split not in SPLITS:
        raise ResearchError(f"{folder}: unknown MS MARCO split '{split}' (choose from {', '.join(SPLITS)})")
    query_names, qrels_names = SPLITS[split] if split is not None else ((), ())
    wanted = [(COLLECTION,)] + ([query_names] if query_names else []) + ([qrels_names] if qrels_names else [])
    for names in wanted:
        if _first(folder, names) is None:
            if not download:
                raise ResearchError(f"{folder}: {names[0]} is missing (MS MARCO split '{split}')")
            fetch(folder, names[0])
    return (folder / COLLECTION, _first(folder, query_names) if query_names else None,
            _first(folder, qrels_names) if qrels_names else None)


def triples_path(folder: Path, kind: str, download: bool = True) -> Path:
    """The training triples by ``text`` (``triples.train.small.tsv``) or by ``ids`` (``qidpidtriples.train.full.2.tsv``)
    in ``folder``, fetched when missing: read them with :mod:`research.data.msmarco`'s triple readers."""
    if kind not in TRIPLES:
        raise ResearchError(f"MS MARCO triples {kind!r}: choose from {', '.join(TRIPLES)}")
    path = folder / TRIPLES[kind]
    if not path.is_file():
        if not download:
            raise ResearchError(f"{path} is missing")
        fetch(folder, TRIPLES[kind])
    return path


def _source(file: str) -> tuple[str, set[str]]:
    if file == "2019qrels-pass.txt":
        return f"{os.environ.get('RESEARCH_TREC_DL_URL', TREC_DL_URL).rstrip('/')}/{file}", {file}
    if file not in _ARCHIVES:
        raise ResearchError(f"no official location known for MS MARCO file {file!r}")
    archive, members = _ARCHIVES[file]
    return f"{os.environ.get('RESEARCH_MSMARCO_URL', MSMARCO_URL).rstrip('/')}/{archive}", members


def fetch(folder: Path, file: str) -> None:
    """Download what holds ``file`` into ``folder``: a tarball (every one of its files not yet there), a gzipped file
    (unpacked) or a plain file; each renamed into place once complete."""
    url, members_wanted = _source(file)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download.") as tmp:
        archive = Path(tmp) / url.rsplit("/", 1)[-1]
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as out:
                shutil.copyfileobj(response, out, length=1 << 20)
        except (urllib.error.URLError, OSError) as err:
            raise ResearchError(f"{folder / file} is missing and downloading {url} failed ({err}); put the MS MARCO "
                                f"files there or set RESEARCH_DATA_DIR") from None
        try:
            if url.endswith(".tar.gz"):
                with tarfile.open(archive, "r:gz") as tar:
                    members = {Path(m.name).name: m for m in tar.getmembers()
                               if m.isfile() and Path(m.name).name in members_wanted}
                    if file not in members:
                        raise ResearchError(f"{url}: archive has no {file}")
                    for name, member in members.items():
                        if not (folder / name).is_file():
                            source = tar.extractfile(member)
                            with open(Path(tmp) / name, "wb") as out:
                                shutil.copyfileobj(source, out, length=1 << 20)
                            os.replace(Path(tmp) / name, folder / name)
            elif url.endswith(".gz"):
                with gzip.open(archive, "rb") as source, open(Path(tmp) / file, "wb") as out:
                    shutil.copyfileobj(source, out, length=1 << 20)
                os.replace(Path(tmp) / file, folder / file)
            else:
                os.replace(archive, folder / file)
        except (tarfile.TarError, gzip.BadGzipFile, EOFError, OSError) as err:
            raise ResearchError(f"{url}: not a readable archive ({err})") from None
    if not (folder / file).is_file():
        raise ResearchError(f"{url}: archive has no {file}")
