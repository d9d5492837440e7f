"""The dev split carved from train: deterministic, disjoint, complete, and a BEIR folder the loaders read."""

from __future__ import annotations

import json

import pytest

from research.cli.main import main
from research.data.beir import load_dataset
from research.data.splits import carve_dev
from research.data.trec import read_tsv_qrels
from research.errors import ResearchError


def make_beir(root, queries: int = 10):
    root.mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": f"doc {i}"}) + "\n"
                                               for i in range(queries)))
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": f"query {i}"}) + "\n"
                                                for i in range(queries + 2)))
    (root / "qrels").mkdir()
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\td{i}\t1\n" for i in range(queries)))
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq10\td0\t1\nq11\td1\t2\n")
    return root


def test_carve_is_seeded_disjoint_and_complete():
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(50)}
    rest, dev = carve_dev(qrels, 0.2, seed=3)
    assert len(dev) == 10 and len(rest) == 40 and not set(rest) & set(dev) and set(rest) | set(dev) == set(qrels)
    assert carve_dev(dict(reversed(list(qrels.items()))), 0.2, seed=3)[1] == dev  # file order does not matter
    assert carve_dev(qrels, 0.2, seed=4)[1] != dev
    with pytest.raises(ResearchError, match="dev share"):
        carve_dev(qrels, 1.0, seed=0)


def test_dev_split_command_writes_a_beir_folder(tmp_path, capsys):
    source = make_beir(tmp_path / "src")
    out = tmp_path / "split"
    assert main(["dev-split", "--data", str(source), "--out", str(out), "--dev-share", "0.3", "--seed", "1"]) == 0
    assert "qrels/dev.tsv" in capsys.readouterr().out
    train, dev = read_tsv_qrels(out / "qrels" / "train.tsv"), read_tsv_qrels(out / "qrels" / "dev.tsv")
    assert len(dev) == 3 and len(train) == 7 and set(train) | set(dev) == set(read_tsv_qrels(source / "qrels" / "train.tsv"))
    assert load_dataset(out, "dev").qrels == dev
    assert load_dataset(out, "test").qrels == read_tsv_qrels(source / "qrels" / "test.tsv")  # other splits unchanged
    assert (out / "corpus.jsonl").is_symlink()
    assert json.loads((out / "split.json").read_text())["dev_queries"] == 3
    # the same command again gives the same split
    main(["dev-split", "--data", str(source), "--out", str(out), "--dev-share", "0.3", "--seed", "1"])
    assert read_tsv_qrels(out / "qrels" / "dev.tsv") == dev
