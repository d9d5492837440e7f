"""MS MARCO passage, full: the named datasets under the data root, downloaded from the official locations (here a
local HTTP server serving a tiny fake collection tarball, the DL19 files and qrels.dev.tsv), the collection read by
byte offset, and RR@10 equal to the official MRR@10 (a port of ``ms_marco_eval.py``), on the real dev.small qrels too."""

from __future__ import annotations

import functools
import gzip
import http.server
import io
import os
import random
import tarfile
import threading
from pathlib import Path

import pytest

from research.cli.main import main
from research.data.beir import load_dataset
from research.data.msmarco_files import read_qrels
from research.data.offsets import OffsetCorpus
from research.data.trec import write_run
from research.errors import ResearchError
from research.eval.metrics import compute_metrics

SHARED = Path(os.environ.get("RESEARCH_DATA_DIR", "/work/shared/data")) / "msmarco-passage"
PASSAGES = {str(i): f"passage {i} about {w} and {w}s" for i, w in enumerate(
    ["rockets", "bread", "whales", "pianos", "orbits", "cheese", "reefs", "violins", "planets", "sugar"])}
FILES = {
    "collection.tsv": "".join(f"{pid}\t{text}\n" for pid, text in PASSAGES.items()),
    "queries.train.tsv": "100\twhat about rockets\n101\tbread and cheese\n",
    "queries.dev.tsv": "200\twhales\n201\tpianos\n202\tplanets\n",
    "queries.dev.small.tsv": "200\twhales\n202\tplanets\n",
    "queries.eval.tsv": "300\tviolins\n",
    "queries.eval.small.tsv": "300\tviolins\n",
    "qrels.train.tsv": "100\t0\t0\t1\n101\t0\t1\t1\n101\t0\t5\t1\n",
    "qrels.dev.small.tsv": "200\t0\t2\t1\n202\t0\t8\t1\n",
}


def _tarball(files: dict[str, str] = FILES) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    """The official files under a local HTTP server; the data root and cache are empty temporary folders."""
    www = tmp_path / "www"
    (www / "deep").mkdir(parents=True)
    (www / "collectionandqueries.tar.gz").write_bytes(_tarball())
    (www / "qrels.dev.tsv").write_text("200\t0\t2\t1\n201\t0\t3\t1\n202\t0\t8\t1\n")
    (www / "msmarco-test2019-queries.tsv.gz").write_bytes(gzip.compress(b"400\twhat is a reef\n401\tsugar cane\n"))
    (www / "deep" / "2019qrels-pass.txt").write_text("400 0 6 3\n400 0 2 1\n401 0 9 2\n401 0 1 0\n")
    (www / "triples.train.small.tar.gz").write_bytes(_tarball({"triples.train.small.tsv": "what about rockets\t"
                                                              f"{PASSAGES['0']}\t{PASSAGES['1']}\n"}))
    (www / "qidpidtriples.train.full.2.tsv.gz").write_bytes(gzip.compress(b"100\t0\t3\n101\t1\t4\n"))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(www)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("RESEARCH_MSMARCO_URL", base)
    monkeypatch.setenv("RESEARCH_TREC_DL_URL", f"{base}/deep")
    monkeypatch.setenv("RESEARCH_DATA_DIR", str(tmp_path / "root"))
    monkeypatch.setenv("RESEARCH_CACHE_DIR", str(tmp_path / "cache"))
    yield www
    httpd.shutdown()
    httpd.server_close()


def test_named_datasets_download_and_load(server, tmp_path):
    dev_small = load_dataset("msmarco-passage/dev-small")  # the CLI's default --split test: the name decides
    folder = tmp_path / "root" / "msmarco-passage"
    assert dev_small.path == folder and dev_small.name == "msmarco-passage" and dev_small.split == "dev-small"
    assert isinstance(dev_small.corpus, OffsetCorpus) and len(dev_small.corpus) == 10
    assert dev_small.corpus["8"].full_text == PASSAGES["8"]
    assert dev_small.queries == {"200": "whales", "202": "planets"} and dev_small.qrels == {"200": {"2": 1}, "202": {"8": 1}}
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)  # the whole tarball, nothing half-written
    dl19 = load_dataset("msmarco-passage/trec-dl-2019")
    assert dl19.qrels == {"400": {"6": 3, "2": 1}, "401": {"9": 2, "1": 0}} and dl19.queries["401"] == "sugar cane"
    assert (folder / "msmarco-test2019-queries.tsv").is_file() and (folder / "2019qrels-pass.txt").is_file()
    dev = load_dataset("msmarco-passage", "dev")
    assert len(dev.qrels) == 3 and (folder / "qrels.dev.tsv").is_file()
    assert load_dataset("msmarco-passage", "train").qrels["101"] == {"1": 1, "5": 1}
    evaluation = load_dataset("msmarco-passage", "eval")
    assert evaluation.qrels == {} and evaluation.queries == {"300": "violins"}
    assert load_dataset("msmarco-passage/dev-small", "dev-small").split == "dev-small"
    with pytest.raises(ResearchError, match="is the 'dev-small' split; --split dev names another one"):
        load_dataset("msmarco-passage/dev-small", "dev")
    with pytest.raises(ResearchError, match="unknown MS MARCO split 'dev2'"):
        load_dataset("msmarco-passage/dev2")
    with pytest.raises(ResearchError, match="unknown MS MARCO split 'test'"):
        load_dataset("msmarco-passage", "test")


def test_training_triples_download_in_both_forms(server, tmp_path):
    from research.data.msmarco import read_triples_ids, read_triples_text
    from research.data.msmarco_files import triples_path

    data = load_dataset("msmarco-passage", "train")
    [by_text] = read_triples_text(triples_path(data.path, "text"))
    assert (by_text.query, by_text.positive, by_text.negative) == ("what about rockets", PASSAGES["0"], PASSAGES["1"])
    by_id = read_triples_ids(triples_path(data.path, "ids"), queries=data.queries, collection=data.corpus)
    assert [(t.query_id, t.positive_id, t.negative_id) for t in by_id] == [("100", "0", "3"), ("101", "1", "4")]
    with pytest.raises(ResearchError, match="choose from text, ids"):
        triples_path(data.path, "pairs")


def test_failed_download_is_one_clear_error_and_leaves_nothing(server, tmp_path):
    (server / "collectionandqueries.tar.gz").unlink()
    with pytest.raises(ResearchError) as info:
        load_dataset("msmarco-passage/dev-small")
    message = str(info.value)
    assert "collection.tsv is missing and downloading" in message and "127.0.0.1" in message and "\n" not in message
    assert [p.name for p in (tmp_path / "root" / "msmarco-passage").iterdir()] == []
    (server / "collectionandqueries.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(ResearchError, match="not a readable archive"):
        load_dataset("msmarco-passage/dev-small")
    assert [p.name for p in (tmp_path / "root" / "msmarco-passage").iterdir()] == []


def test_anserini_file_names_are_read_without_download(tmp_path, monkeypatch):
    monkeypatch.setenv("RESEARCH_DATA_DIR", str(tmp_path / "root"))
    monkeypatch.setenv("RESEARCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("RESEARCH_MSMARCO_URL", "http://127.0.0.1:9")  # never contacted
    folder = tmp_path / "root" / "msmarco-passage"
    folder.mkdir(parents=True)
    (folder / "collection.tsv").write_text(FILES["collection.tsv"])
    (folder / "topics.msmarco-passage.dev-subset.txt").write_text(FILES["queries.dev.small.tsv"])
    (folder / "qrels.msmarco-passage.dev-subset.txt").write_text(FILES["qrels.dev.small.tsv"])
    assert load_dataset("msmarco-passage/dev-small").qrels == {"200": {"2": 1}, "202": {"8": 1}}
    (folder / "qrels.msmarco-passage.dev-subset.txt").write_text("200\t0\t2\t1\n202\t0\t77\t1\n")
    with pytest.raises(ResearchError, match=r"dev-subset.txt:2: field 'doc_id' unknown passage '77'"):
        load_dataset("msmarco-passage/dev-small")


def test_index_and_search_run_on_the_named_dataset(server, tiny_model_dir, tmp_path):
    index = tmp_path / "index"
    assert main(["index", "--model", str(tiny_model_dir), "--data", "msmarco-passage", "--out", str(index),
                 "--accelerator", "cpu", "--shard-size", "4"]) == 0
    assert main(["search", "--index", str(index), "--data", "msmarco-passage/dev-small", "--out",
                 str(tmp_path / "search")]) == 0
    assert (tmp_path / "search" / "metrics.json").is_file()


# ------------------------------------------------------------------ RR@10 is the official MRR@10
def official_mrr10(run_file: Path, qrels_file: Path) -> float:
    """``ms_marco_eval.py``'s compute_metrics (MRR@10 over the reference's queries), from a TREC run file."""
    relevant: dict[str, set[str]] = {}
    for line in qrels_file.read_text().splitlines():
        qid, _, pid, _ = line.split()
        relevant.setdefault(qid, set()).add(pid)
    ranked: dict[str, list[str]] = {}
    for line in run_file.read_text().splitlines():
        qid, _, pid, rank, _, _ = line.split()
        ranked.setdefault(qid, [None] * 1000)[int(rank) - 1] = pid
    total = 0.0
    for qid, candidates in ranked.items():
        if qid in relevant:
            for i in range(10):
                if candidates[i] in relevant[qid]:
                    total += 1 / (i + 1)
                    break
    return total / len(relevant)


def _random_run(qrels: dict[str, dict[str, int]], pids: list[str], seed: int) -> dict[str, dict[str, float]]:
    rng = random.Random(seed)
    run = {}
    for qid, docs in qrels.items():
        if rng.random() < 0.1:
            continue  # no result for this query: it counts 0 in both
        candidates = rng.sample(pids, 30) + [d for d in docs if rng.random() < 0.6]
        run[qid] = {d: round(rng.random(), 2) for d in candidates}  # 2 decimals: many ties
    return run


def test_rr10_equals_official_mrr10_on_the_real_dev_small_qrels(tmp_path):
    qrels_file = SHARED / "qrels.msmarco-passage.dev-subset.txt"
    if not qrels_file.is_file():
        pytest.skip(f"{qrels_file} is not here (see /work/shared/data/MANIFEST.md)")
    qrels = read_qrels(qrels_file)
    assert len(qrels) == 6980
    pids = sorted({d for docs in qrels.values() for d in docs})
    for seed in range(3):
        run = _random_run(qrels, pids, seed)
        write_run(tmp_path / "run.trec", run)
        ours = compute_metrics(run, qrels, ["RR@10"]).aggregate["RR@10"]
        assert ours == pytest.approx(official_mrr10(tmp_path / "run.trec", qrels_file), abs=1e-12)
        assert 0.05 < ours < 0.9
