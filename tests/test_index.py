"""Sharded indexes: exact search merged over shards equals one flat index; ``research index`` + ``research search``
equal ``research evaluate``; factory indexes are built once, saved and reused; bad input stops with an error naming
the file, and a half-written shard is never read as complete."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from research.cli.main import main
from research.errors import DataFormatError, ResearchError
from research.retrieval.dense import dense_search, merge_top_k
from research.retrieval.index.manifest import IndexManifest, read_manifest
from research.retrieval.index.search import ShardedIndex, search_index
from research.retrieval.index.shards import missing_shards, shard_paths, write_shard


def make_index(directory: Path, docs: np.ndarray, shard_size: int, dtype: str = "float32") -> list[str]:
    ids = [f"d{i}" for i in range(len(docs))]
    manifest = IndexManifest("m", "fp", "mean", True, "", 32, "32-true", dtype, docs.shape[1], len(docs), "corpus",
                             shard_size, 16, "cpu")
    manifest.write(directory)
    for shard in range(manifest.num_shards):
        start, rows = manifest.shard_rows(shard)
        write_shard(directory, manifest, shard, ids[start:start + rows], docs[start:start + rows])
    return ids


@pytest.mark.parametrize("shard_size", [1, 7, 64, 500])
def test_exact_search_over_shards_equals_one_flat_index(tmp_path, shard_size):
    rng = np.random.default_rng(shard_size)
    docs = rng.standard_normal((300, 16)).astype(np.float32)
    docs[150] = docs[10]  # an exact tie, across shards for most shard sizes
    queries = rng.standard_normal((25, 16)).astype(np.float32)
    ids = make_index(tmp_path, docs, shard_size)
    qids = [f"q{i}" for i in range(len(queries))]
    run, info = search_index(ShardedIndex(tmp_path, verify=True), qids, queries, k=20)
    expected = dense_search(torch.from_numpy(queries), torch.from_numpy(docs), qids, ids, k=20)
    assert info.kind == "exact" and run.keys() == expected.keys()
    for qid in qids:
        assert sorted(run[qid].values()) == sorted(expected[qid].values())  # the same scores, bit for bit
        kth = min(run[qid].values())
        assert {d: s for d, s in run[qid].items() if s > kth} == {d: s for d, s in expected[qid].items() if s > kth}
        if "d150" in run[qid] and run[qid]["d150"] == kth:
            assert "d10" in run[qid]  # a tie at the cut keeps the lower row (faiss' own choice is arbitrary)


def test_merge_is_exact_and_breaks_ties_by_row():
    a = (np.array([[3.0, 1.0, -np.inf]]), np.array([[5, 2, -1]]))
    b = (np.array([[3.0, 2.0, 0.5]]), np.array([[4, 9, 8]]))
    scores, rows = merge_top_k(a, b, 3)
    assert rows.tolist() == [[4, 5, 9]] and scores.tolist() == [[3.0, 3.0, 2.0]]
    assert merge_top_k(b, a, 3)[1].tolist() == [[4, 5, 9]]  # the order of the shards does not matter


def test_float16_shards_search_close_to_float32(tmp_path):
    rng = np.random.default_rng(0)
    docs = rng.standard_normal((200, 8)).astype(np.float32)
    ids = make_index(tmp_path, docs, 50, dtype="float16")
    index = ShardedIndex(tmp_path)
    assert index.shards[0].embeddings.dtype == np.float16 and len(index) == 200 and index.doc_ids() == ids
    assert np.abs(index.vectors(np.arange(200)) - docs).max() < 5e-3


def test_factory_index_is_built_saved_and_reused(tmp_path):
    rng = np.random.default_rng(1)
    docs = rng.standard_normal((400, 16)).astype(np.float32)
    make_index(tmp_path, docs, 100)
    index, queries, qids = ShardedIndex(tmp_path), docs[:30] + 0.01, [f"q{i}" for i in range(30)]
    exact, _ = search_index(index, qids, queries, k=10)
    ivf, info = search_index(index, qids, queries, k=10, factory="IVF4,Flat", nprobe=4)
    assert info.built and Path(info.path).is_file() and info.train_size == 400
    assert ivf == exact  # every list probed: exact
    again, info2 = search_index(index, qids, queries, k=10, factory="IVF4,Flat", nprobe=1)
    assert not info2.built and info2.path == info.path
    recall = np.mean([len(set(again[q]) & set(exact[q])) / 10 for q in qids])
    assert 0.2 < recall <= 1.0
    hnsw, info3 = search_index(index, qids, queries, k=10, factory="HNSW16", efsearch=64)
    assert info3.built and info3.train_size == 0 and np.mean([len(set(hnsw[q]) & set(exact[q])) for q in qids]) > 8
    with pytest.raises(ResearchError, match="--nprobe does not apply to the index 'HNSW16'"):
        search_index(index, qids, queries, k=10, factory="HNSW16", nprobe=3)
    with pytest.raises(ResearchError, match=r"'IVF512,Flat': training failed \(Number of training points \(400\)"):
        search_index(index, qids, queries, k=10, factory="IVF512,Flat")
    with pytest.raises(ResearchError, match="faiss cannot build it"):
        search_index(index, qids, queries, k=10, factory="NotAnIndex99")
    with pytest.raises(ResearchError, match="need --index-factory"):
        search_index(index, qids, queries, k=10, nprobe=3)


# ------------------------------------------------------------------ files that must not be read as complete
def test_half_written_and_cut_short_shards_are_refused(tmp_path):
    rng = np.random.default_rng(2)
    make_index(tmp_path, rng.standard_normal((30, 4)).astype(np.float32), 10)
    manifest = read_manifest(tmp_path)
    emb, ids, done = shard_paths(tmp_path, 1)
    done.unlink()  # killed after the arrays, before the marker
    assert missing_shards(tmp_path, manifest) == [1]
    with pytest.raises(DataFormatError, match=r"000001\.json: 1 of 3 shards are not complete"):
        ShardedIndex(tmp_path)
    write_shard(tmp_path, manifest, 1, [f"d{i}" for i in range(10, 20)], np.zeros((10, 4), np.float32))
    emb.write_bytes(emb.read_bytes()[:-7])  # cut short afterwards
    with pytest.raises(DataFormatError, match=r"000001\.npy: shard file cut short or altered"):
        ShardedIndex(tmp_path)
    write_shard(tmp_path, manifest, 1, [f"d{i}" for i in range(10, 20)], np.zeros((10, 4), np.float32))
    raw = bytearray(emb.read_bytes())
    raw[-1] ^= 0xFF  # same size, other bytes: only the checksum sees it
    emb.write_bytes(bytes(raw))
    ShardedIndex(tmp_path)
    with pytest.raises(DataFormatError, match="checksum differs"):
        ShardedIndex(tmp_path, verify=True)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataFormatError, match="manifest.json: not a readable manifest"):
        ShardedIndex(tmp_path)


# ------------------------------------------------------------------ the commands
def _index(model, data, out, *extra) -> int:
    return main(["index", "--model", str(model), "--data", str(data), "--out", str(out), "--accelerator", "cpu",
                 "--batch-size", "4", *extra])


def test_index_and_search_equal_evaluate(tiny_model_dir, tiny_beir_dir, tmp_path, capsys):
    assert _index(tiny_model_dir, tiny_beir_dir, tmp_path / "index", "--shard-size", "10") == 0
    out = capsys.readouterr().out
    assert "36 documents in 4 shards of 10 (4 encoded now, 0 already there" in out
    manifest = read_manifest(tmp_path / "index")
    assert (manifest.count, manifest.dim, manifest.dtype, manifest.precision) == (36, 32, "float32", "32-true")
    assert main(["search", "--index", str(tmp_path / "index"), "--data", str(tiny_beir_dir), "--out",
                 str(tmp_path / "search")]) == 0
    assert main(["evaluate", "--model", str(tiny_model_dir), "--data", str(tiny_beir_dir), "--out",
                 str(tmp_path / "evaluate")]) == 0
    searched = json.loads((tmp_path / "search" / "metrics.json").read_text())
    evaluated = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    for key in ("nDCG@10", "RR@10", "R@100", "AP@100"):
        assert searched[key] == pytest.approx(evaluated[key], abs=1e-6)
    assert searched["search"] == "exact" and searched["queries"] == 12
    # a rerun finds every shard: nothing to encode
    assert _index(tiny_model_dir, tiny_beir_dir, tmp_path / "index", "--shard-size", "10") == 0
    assert "(0 encoded now, 4 already there" in capsys.readouterr().out
    # queries from a file, no qrels: a run file only
    queries = tmp_path / "queries.tsv"
    queries.write_text("a\trocket orbit planet\nb\tbread cheese\n")
    assert main(["search", "--index", str(tmp_path / "index"), "--queries", str(queries), "--out",
                 str(tmp_path / "file"), "--top-k", "5"]) == 0
    lines = (tmp_path / "file" / "run.trec").read_text().splitlines()
    assert len(lines) == 10 and not (tmp_path / "file" / "metrics.json").exists()


def test_index_refuses_other_settings_and_search_another_model(tiny_model_dir, tiny_beir_dir, tmp_path, capsys):
    from helpers import make_tiny_model_dir

    assert _index(tiny_model_dir, tiny_beir_dir, tmp_path / "index", "--shard-size", "10") == 0
    other = make_tiny_model_dir(tmp_path / "other", seed=1)
    capsys.readouterr()
    assert _index(other, tiny_beir_dir, tmp_path / "index", "--shard-size", "10") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("research: error: ") and "manifest.json: made with other settings" in err
    assert "model_fingerprint" in err and "\n" not in err
    assert _index(tiny_model_dir, tiny_beir_dir, tmp_path / "index", "--shard-size", "12") == 2
    assert "shard_size: 10 there, 12 here" in capsys.readouterr().err
    assert main(["search", "--index", str(tmp_path / "index"), "--data", str(tiny_beir_dir), "--out",
                 str(tmp_path / "s"), "--model", str(other)]) == 2
    assert "made with another model" in capsys.readouterr().err
    assert main(["search", "--index", str(tmp_path / "index"), "--data", str(tiny_beir_dir), "--out",
                 str(tmp_path / "s"), "--gpu"]) == 2
    assert "--gpu: this faiss has no GPU support" in capsys.readouterr().err
    changed = tmp_path / "changed"
    shutil.copytree(tiny_beir_dir, changed)
    (changed / "corpus.jsonl").write_text((changed / "corpus.jsonl").read_text().replace("rocket", "comet", 1))
    assert main(["search", "--index", str(tmp_path / "index"), "--data", str(changed), "--out",
                 str(tmp_path / "s")]) == 2
    assert "the index holds another corpus than --data" in capsys.readouterr().err


def test_malformed_corpus_line_names_file_and_line(tiny_model_dir, tiny_beir_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_beir_dir, data)
    lines = (data / "corpus.jsonl").read_text().splitlines()
    lines[4] = lines[4][:-3]  # cut short: not valid JSON
    (data / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    assert _index(tiny_model_dir, data, tmp_path / "index") == 2
    err = capsys.readouterr().err
    assert f"{(data / 'corpus.jsonl').resolve()}:5: invalid JSON" in err
    assert not (tmp_path / "index").exists()
