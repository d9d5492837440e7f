"""BEIR-format loading: a valid folder, every malformed case (file, line and field named), the data root and downloads."""

from __future__ import annotations

import functools
import http.server
import io
import json
import threading
import zipfile
from pathlib import Path

import pytest
from helpers import write_jsonl, write_qrels

from research.data.beir import (
    Document,
    data_root,
    download_beir,
    load_corpus,
    load_dataset,
    load_queries,
    resolve_dataset,
)
from research.errors import DataFormatError, ResearchError

CORPUS = [
    {"_id": "d1", "title": "Rocket launch", "text": "A rocket reaches orbit.", "metadata": {}},
    {"_id": "d2", "title": "", "text": "Bread is baked in a kitchen."},
    {"_id": "d3", "title": "  Whales  ", "text": " Whales sing. "},
    {"_id": 4, "text": "An integer id is read as a string."},
]
QUERIES = [
    {"_id": "q1", "text": "how do rockets reach orbit"},
    {"_id": "q2", "text": "where is bread baked"},
    {"_id": "q3", "text": "an unjudged query"},
]
TEST_QRELS = [("q1", "d1", 2), ("q1", "d3", 1), ("q2", "d2", 1), ("q2", "4", 0)]


def write_folder(root: Path, corpus=CORPUS, queries=QUERIES, qrels=TEST_QRELS) -> Path:
    write_jsonl(root / "corpus.jsonl", corpus)
    write_jsonl(root / "queries.jsonl", queries)
    write_qrels(root / "qrels" / "test.tsv", qrels, header=True, newline="\r\n")
    write_qrels(root / "qrels" / "train.tsv", [("q2", "d2", 1), ("q3", "d1", 1)], header=False)
    return root


def test_loads_a_valid_folder(tmp_path):
    data = load_dataset(write_folder(tmp_path / "tiny"), "test")
    assert data.name == "tiny" and data.split == "test"
    assert data.corpus["d1"] == Document("Rocket launch", "A rocket reaches orbit.")
    assert data.corpus["d1"].full_text == "Rocket launch A rocket reaches orbit."
    assert data.corpus["d2"].full_text == "Bread is baked in a kitchen."  # no title: no leading space
    assert data.corpus["d3"].full_text == "Whales Whales sing."
    assert data.corpus["4"].full_text == "An integer id is read as a string."
    assert list(data.corpus) == ["d1", "d2", "d3", "4"]
    assert data.queries == {"q1": "how do rockets reach orbit", "q2": "where is bread baked", "q3": "an unjudged query"}
    # CRLF and a header; graded scores (and a 0 row) kept as written
    assert data.qrels == {"q1": {"d1": 2, "d3": 1}, "q2": {"d2": 1, "4": 0}}
    assert list(data.judged_queries) == ["q1", "q2"]
    # a qrels file without header
    train = load_dataset(tmp_path / "tiny", "train")
    assert train.qrels == {"q2": {"d2": 1}, "q3": {"d1": 1}}
    assert list(train.judged_queries) == ["q2", "q3"]
    assert load_dataset(tmp_path / "tiny", None).qrels == {}


def test_bom_and_blank_lines_accepted(tmp_path):
    root = write_folder(tmp_path / "bom")
    corpus = root / "corpus.jsonl"
    corpus.write_bytes(b"\xef\xbb\xbf" + corpus.read_bytes().replace(b"\n", b"\r\n", 1) + b"\n  \n")
    qrels = root / "qrels" / "test.tsv"
    qrels.write_bytes(b"\xef\xbb\xbf" + qrels.read_bytes())
    data = load_dataset(root, "test")
    assert list(data.corpus) == ["d1", "d2", "d3", "4"]
    assert data.qrels["q1"] == {"d1": 2, "d3": 1}


def test_missing_split_names_the_available_ones(tmp_path):
    with pytest.raises(ResearchError, match=r"no qrels for split 'dev' \(available: test, train\)"):
        load_dataset(write_folder(tmp_path / "tiny"), "dev")


def _line(record) -> str:
    return record if isinstance(record, str) else json.dumps(record)


def _lines(records, index, replacement) -> str:
    out = [_line(r) for r in records]
    out[index] = replacement
    return "\n".join(out) + "\n"


# (case id, file, text of the file, expected line, expected field, fragment of the reason)
BAD_JSONL = [
    ("invalid-json", "corpus.jsonl", _lines(CORPUS, 1, '{"_id": "d2", "text": "x",}'), 2, None, "invalid JSON"),
    ("not-an-object", "corpus.jsonl", _lines(CORPUS, 2, '["d3", "text"]'), 3, None, "expected a JSON object"),
    ("missing-id", "corpus.jsonl", _lines(CORPUS, 1, '{"title": "t", "text": "x"}'), 2, "_id", "missing"),
    ("missing-text", "corpus.jsonl", _lines(CORPUS, 2, '{"_id": "d3", "title": "Whales"}'), 3, "text", "missing"),
    ("text-not-string", "corpus.jsonl", _lines(CORPUS, 0, '{"_id": "d1", "text": 5}'), 1, "text", "expected string, got int"),
    ("title-not-string", "corpus.jsonl", _lines(CORPUS, 0, '{"_id": "d1", "title": 7, "text": "x"}'), 1, "title",
     "expected string, got int"),
    ("title-list", "corpus.jsonl", _lines(CORPUS, 0, '{"_id": "d1", "title": [], "text": "x"}'), 1, "title",
     "expected string, got list"),
    ("id-list", "corpus.jsonl", _lines(CORPUS, 3, '{"_id": ["d4"], "text": "x"}'), 4, "_id", "expected string, got list"),
    ("id-bool", "corpus.jsonl", _lines(CORPUS, 3, '{"_id": true, "text": "x"}'), 4, "_id", "expected string, got bool"),
    ("id-empty", "corpus.jsonl", _lines(CORPUS, 3, '{"_id": " ", "text": "x"}'), 4, "_id", "empty"),
    ("empty-text-and-title", "corpus.jsonl", _lines(CORPUS, 1, '{"_id": "d2", "title": " ", "text": ""}'), 2, "text",
     "empty"),
    ("duplicate-doc", "corpus.jsonl", _lines(CORPUS, 2, '{"_id": "d1", "text": "again"}'), 3, "_id", "duplicate id 'd1'"),
    ("truncated-last-line", "corpus.jsonl", "\n".join(_line(r) for r in CORPUS[:3]) + '\n{"_id": "4", "te', 4, None,
     "invalid JSON"),
    ("query-missing-text", "queries.jsonl", _lines(QUERIES, 1, '{"_id": "q2"}'), 2, "text", "missing"),
    ("query-empty-text", "queries.jsonl", _lines(QUERIES, 2, '{"_id": "q3", "text": "  "}'), 3, "text", "empty"),
    ("query-text-mistyped", "queries.jsonl", _lines(QUERIES, 0, '{"_id": "q1", "text": null}'), 1, "text",
     "expected string, got NoneType"),
    ("duplicate-query", "queries.jsonl", _lines(QUERIES, 2, '{"_id": "q1", "text": "again"}'), 3, "_id",
     "duplicate id 'q1'"),
    ("query-truncated", "queries.jsonl", "\n".join(_line(r) for r in QUERIES[:2]) + '\n{"_id": "q3"', 3, None,
     "invalid JSON"),
]

QRELS_HEADER = "query-id\tcorpus-id\tscore\r\n"
BAD_QRELS = [
    ("unknown-query", QRELS_HEADER + "q1\td1\t1\r\nq2\td2\t1\r\nq9\td1\t1\r\n", 4, "query-id", "unknown query 'q9'"),
    ("unknown-doc", QRELS_HEADER + "q1\td1\t1\r\nq1\td9\t1\r\nq2\td2\t1\r\n", 3, "corpus-id", "unknown document 'd9'"),
    ("unknown-doc-later-query", QRELS_HEADER + "q1\td1\t1\r\nq2\td2\t1\r\nq1\td3\t1\r\nq2\tdX\t1\r\n", 5, "corpus-id",
     "unknown document 'dX'"),
    ("score-not-integer", QRELS_HEADER + "q1\td1\t1\r\nq1\td3\thigh\r\n", 3, "score", "expected an integer"),
    ("duplicate-pair", QRELS_HEADER + "q1\td1\t1\r\nq1\td1\t2\r\n", 3, "corpus-id", "duplicate document 'd1'"),
    ("empty-field", QRELS_HEADER + "q1\t\t1\r\n", 2, "corpus-id", "empty"),
    ("wrong-columns", QRELS_HEADER + "q1\td1\t1\r\nq1 d3 1\r\n", 3, None, "expected 3 tab-separated fields"),
]


def _assert_error(err: DataFormatError, path: Path, line: int, field: str | None, reason: str) -> None:
    assert Path(err.path) == path
    assert err.line == line
    assert err.field == field
    assert reason in err.reason
    where = f"{path}:{line}:" + (f" field '{field}'" if field else "")
    assert str(err).startswith(where + " "), str(err)
    assert "\n" not in str(err)


@pytest.mark.parametrize(("case", "name", "text", "line", "field", "reason"), BAD_JSONL, ids=[c[0] for c in BAD_JSONL])
def test_malformed_jsonl_names_file_line_and_field(tmp_path, case, name, text, line, field, reason):
    root = write_folder(tmp_path / "bad")
    (root / name).write_text(text, encoding="utf-8")
    with pytest.raises(DataFormatError) as info:
        load_dataset(root, "test")
    _assert_error(info.value, root / name, line, field, reason)


@pytest.mark.parametrize(("case", "text", "line", "field", "reason"), BAD_QRELS, ids=[c[0] for c in BAD_QRELS])
def test_malformed_qrels_names_file_line_and_field(tmp_path, case, text, line, field, reason):
    root = write_folder(tmp_path / "bad")
    (root / "qrels" / "test.tsv").write_bytes(text.encode())
    with pytest.raises(DataFormatError) as info:
        load_dataset(root, "test")
    _assert_error(info.value, root / "qrels" / "test.tsv", line, field, reason)
    # the other split of the same folder is unaffected
    assert load_dataset(root, "train").qrels == {"q2": {"d2": 1}, "q3": {"d1": 1}}


def test_non_utf8_bytes_name_the_line(tmp_path):
    root = write_folder(tmp_path / "bad")
    lines = (root / "corpus.jsonl").read_bytes().split(b"\n")
    lines[2] = b'{"_id": "d3", "text": "caf\xe9"}'  # Latin-1, not UTF-8
    (root / "corpus.jsonl").write_bytes(b"\n".join(lines))
    with pytest.raises(DataFormatError) as info:
        load_dataset(root, "test")
    _assert_error(info.value, root / "corpus.jsonl", 3, None, "not valid UTF-8")


def test_empty_and_missing_files(tmp_path):
    root = write_folder(tmp_path / "bad")
    (root / "queries.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match="no queries"):
        load_queries(root / "queries.jsonl")
    (root / "corpus.jsonl").unlink()
    with pytest.raises(DataFormatError, match=r"corpus\.jsonl: file not found"):
        load_corpus(root / "corpus.jsonl")


def test_nothing_half_loaded(tmp_path):
    """A bad last qrels line: load_dataset raises and hands back nothing, and a later good load is complete."""
    root = write_folder(tmp_path / "bad")
    good = (root / "qrels" / "test.tsv").read_bytes()
    (root / "qrels" / "test.tsv").write_bytes(good + b"q3\td1\tx\r\n")
    result = None
    with pytest.raises(DataFormatError):
        result = load_dataset(root, "test")
    assert result is None
    (root / "qrels" / "test.tsv").write_bytes(good)
    assert load_dataset(root, "test").qrels == {"q1": {"d1": 2, "d3": 1}, "q2": {"d2": 1, "4": 0}}


# ------------------------------------------------------------------ data root and download
def test_name_resolves_under_data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("RESEARCH_DATA_DIR", str(tmp_path / "root"))
    write_folder(tmp_path / "root" / "mydata")
    assert data_root() == tmp_path / "root"
    assert resolve_dataset("mydata") == tmp_path / "root" / "mydata"
    data = load_dataset("mydata", "test")
    assert data.name == "mydata" and data.qrels["q1"] == {"d1": 2, "d3": 1}
    with pytest.raises(ResearchError, match=r"dataset 'nothing' not found.*RESEARCH_DATA_DIR"):
        load_dataset("nothing")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def beir_server(tmp_path, monkeypatch):
    """A local HTTP server over ``tmp_path/www``; RESEARCH_BEIR_URL points at it."""
    www = tmp_path / "www"
    www.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("RESEARCH_BEIR_URL", f"http://127.0.0.1:{server.server_address[1]}/")
    monkeypatch.setenv("RESEARCH_DATA_DIR", str(tmp_path / "root"))
    yield www
    server.shutdown()
    server.server_close()


def _zip_folder(folder: Path, name: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, f"{name}/{path.relative_to(folder).as_posix()}")
    return buffer.getvalue()


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_missing_beir_dataset_is_downloaded(tmp_path, beir_server):
    source = write_folder(tmp_path / "src")
    (beir_server / "scifact.zip").write_bytes(_zip_folder(source, "scifact"))
    data = load_dataset("scifact", "test")
    root = tmp_path / "root"
    assert data.path == root / "scifact"
    assert data.qrels == {"q1": {"d1": 2, "d3": 1}, "q2": {"d2": 1, "4": 0}}
    assert (root / "scifact" / "qrels" / "train.tsv").read_bytes() == (source / "qrels" / "train.tsv").read_bytes()
    assert _leftovers(root) == ["scifact"]  # no temporary folder or archive left beside it
    # a second process that downloaded it too (DDP ranks racing) keeps the first copy and leaves nothing behind
    (root / "scifact" / "marker").write_text("first")
    assert download_beir("scifact", root) == root / "scifact"
    assert (root / "scifact" / "marker").read_text() == "first" and _leftovers(root) == ["scifact"]
    (beir_server / "scifact.zip").unlink()  # now found locally: no second download
    assert load_dataset("scifact", "train").path == root / "scifact"


@pytest.mark.parametrize("content", [None, b"this is not a zip archive", "no-corpus"], ids=["http-404", "not-a-zip", "no-corpus"])
def test_failed_download_is_a_clear_error_and_leaves_nothing(tmp_path, beir_server, content):
    if content == "no-corpus":
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as zf:
            zf.writestr("nfcorpus/queries.jsonl", json.dumps(QUERIES[0]) + "\n")
        content = buffer.getvalue()
    if content is not None:
        (beir_server / "nfcorpus.zip").write_bytes(content)
    with pytest.raises(ResearchError) as info:
        load_dataset("nfcorpus", "test")
    message = str(info.value)
    assert "nfcorpus" in message and "127.0.0.1" in message
    assert "\n" not in message
    assert _leftovers(tmp_path / "root") == []


def test_download_can_be_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("RESEARCH_DATA_DIR", str(tmp_path / "root"))
    monkeypatch.setenv("RESEARCH_BEIR_URL", "http://127.0.0.1:9/")  # never contacted
    with pytest.raises(ResearchError, match="dataset 'scifact' not found"):
        resolve_dataset("scifact", download=False)
    assert not (tmp_path / "root" / "scifact").exists()
