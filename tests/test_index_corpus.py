"""Corpora read through a byte-offset index (research.data.offsets): the same documents as the dict readers, built
once and memory-mapped, rebuilt when the file changes; every malformed line still names its file and line."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from research.data.beir import load_corpus, load_dataset, open_corpus
from research.errors import DataFormatError


def _write(path: Path, raw: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    return path


def _records(n: int) -> list[dict]:
    return [{"_id": f"doc{i}", "title": f"title {i}" if i % 3 else "", "text": f"text of document {i} " * (i % 5 + 1)}
            for i in range(n)]


def test_offset_corpus_equals_the_dict_reader(tmp_path, monkeypatch):
    monkeypatch.setenv("RESEARCH_CACHE_DIR", str(tmp_path / "cache"))
    lines = [json.dumps(r) for r in _records(50)]
    lines.insert(7, "   ")  # blank lines are skipped, not records
    raw = "\ufeff" + "\r\n".join(lines) + "\r\n\n"  # a BOM and CRLF, as some exports have
    path = _write(tmp_path / "corpus.jsonl", raw.encode("utf-8"))
    corpus, expected = open_corpus(path), load_corpus(path)
    assert len(corpus) == 50 and list(corpus) == list(expected)
    assert dict(corpus.items()) == expected and list(corpus.values()) == list(expected.values())
    assert corpus["doc17"] == expected["doc17"] and "doc49" in corpus and "doc50" not in corpus and 3 not in corpus
    with pytest.raises(KeyError):
        corpus["nope"]
    assert corpus.rows(48, 60) == list(expected.items())[48:]
    assert corpus.row_of("doc8") == 8
    for array in (corpus.index.offsets, corpus.index.lines, corpus.index.hashes):
        assert isinstance(array, np.memmap)  # nothing but the index arrays, and those mapped
    again = open_corpus(path)
    assert again.index.folder == corpus.index.folder  # built once
    clone = pickle.loads(pickle.dumps(corpus))  # DataLoader workers / spawned ranks reopen, never copy
    assert len(pickle.dumps(corpus)) < 2000 and clone["doc3"] == expected["doc3"]


def test_a_changed_file_gets_a_new_index(tmp_path, monkeypatch):
    monkeypatch.setenv("RESEARCH_CACHE_DIR", str(tmp_path / "cache"))
    path = _write(tmp_path / "corpus.jsonl", "".join(json.dumps(r) + "\n" for r in _records(5)).encode())
    first = open_corpus(path)
    _write(path, "".join(json.dumps(r) + "\n" for r in _records(7)).encode())
    second = open_corpus(path)
    assert len(second) == 7 and second.index.folder != first.index.folder and second.digest != first.digest


@pytest.mark.parametrize("line, field, reason", [
    ('{"_id": "a", "text": "x"', None, "invalid JSON"),
    ('["a", "b"]', None, "expected a JSON object, got list"),
    ('{"text": "x"}', "_id", "missing"),
    ('{"_id": "a", "title": 3, "text": "x"}', "title", "expected string, got int"),
    ('{"_id": "a", "title": "", "text": "  "}', "text", "empty (and no title)"),
    ('{"_id": "doc1", "text": "again"}', "_id", "duplicate id 'doc1'"),
], ids=["truncated-json", "not-an-object", "no-id", "title-type", "empty", "duplicate"])
def test_malformed_jsonl_line_names_file_line_and_field(tmp_path, monkeypatch, line, field, reason):
    monkeypatch.setenv("RESEARCH_CACHE_DIR", str(tmp_path / "cache"))
    good = [json.dumps(r) for r in _records(3)]
    path = _write(tmp_path / "corpus.jsonl", "\n".join([*good, line, *good[:0]]).encode() + b"\n")
    with pytest.raises(DataFormatError) as info:
        open_corpus(path)
    err = info.value
    assert (Path(err.path).name, err.line, err.field) == ("corpus.jsonl", 4, field) and reason in err.reason
    assert not list((tmp_path / "cache" / "offsets").glob("*/meta.json"))  # nothing saved for a bad file


def test_non_utf8_line_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("RESEARCH_CACHE_DIR", str(tmp_path / "cache"))
    path = _write(tmp_path / "corpus.jsonl", b'{"_id": "a", "text": "x"}\n{"_id": "b", "text": "\xff"}\n')
    with pytest.raises(DataFormatError, match=r"corpus.jsonl:2: not valid UTF-8"):
        open_corpus(path)


@pytest.mark.parametrize("text, field, reason", [
    ("7\tone\ttwo", None, "expected 2 tab-separated columns"),
    ("x7\tpassage", "pid", "expected a non-negative integer id"),
    ("7\t   ", "text", "empty"),
    ("1\tagain", "pid", "duplicate id '1'"),
], ids=["columns", "pid", "empty", "duplicate"])
def test_malformed_collection_line_names_file_line_and_field(tmp_path, monkeypatch, text, field, reason):
    monkeypatch.setenv("RESEARCH_CACHE_DIR", str(tmp_path / "cache"))
    path = _write(tmp_path / "collection.tsv", f"0\tfirst passage\n1\tsecond passage\n{text}\n".encode())
    with pytest.raises(DataFormatError) as info:
        open_corpus(path)
    err = info.value
    assert (Path(err.path).name, err.line, err.field) == ("collection.tsv", 3, field) and reason in err.reason


def test_lazy_dataset_checks_qrels_against_the_offset_corpus(tiny_beir_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RESEARCH_CACHE_DIR", str(tmp_path / "cache"))
    lazy, eager = load_dataset(tiny_beir_dir, "test", lazy_corpus=True), load_dataset(tiny_beir_dir, "test")
    assert lazy.qrels == eager.qrels and dict(lazy.corpus.items()) == eager.corpus
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("corpus.jsonl", "queries.jsonl"):
        (broken / name).write_bytes((tiny_beir_dir / name).read_bytes())
    (broken / "qrels").mkdir()
    first_query = next(iter(eager.qrels))
    (broken / "qrels" / "test.tsv").write_text(f"query-id\tcorpus-id\tscore\n{first_query}\tghost\t1\n")
    with pytest.raises(DataFormatError, match=r"test.tsv:2: field 'corpus-id' unknown document 'ghost'"):
        load_dataset(broken, "test", lazy_corpus=True)
