"""The ``research`` command (bm25, evaluate, fit; errors as one line with exit code 2) and the evaluation tools
behind it: exact dense search, saved evaluations and BM25 against a hand-computed Lucene BM25."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from research.cli.main import main
from research.data.beir import Document, RetrievalDataset, load_dataset
from research.data.trec import read_run
from research.eval.evaluation import evaluate_run, save_evaluation
from research.eval.metrics import compute_metrics
from research.models.bi_encoder import BiEncoder
from research.retrieval.bm25 import BM25Config, bm25_search
from research.retrieval.dense import dense_search

REPO = Path(__file__).resolve().parents[1]
KEYS = ["nDCG@10", "RR@10", "R@100", "AP@100"]


def _check_outputs(out: Path, data_dir: Path, split: str = "test") -> dict:
    """run.trec and metrics.json exist, and the metrics equal those recomputed from the run file."""
    run = read_run(out / "run.trec")
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics)[:4] == KEYS
    qrels = load_dataset(data_dir, split).qrels
    assert set(run) == set(qrels)
    expected = compute_metrics(run, qrels, metrics=KEYS)
    for key in KEYS:
        assert metrics[key] == pytest.approx(expected.aggregate[key], abs=1e-12)
    assert metrics["num_queries"] == len(qrels)
    per_query = json.loads((out / "per_query.json").read_text())
    assert per_query == expected.per_query  # JSON floats round-trip exactly
    return metrics


# ------------------------------------------------------------------ research bm25 / evaluate
def test_bm25_command(tiny_beir_dir, tmp_path, capsys):
    assert main(["bm25", "--data", str(tiny_beir_dir), "--out", str(tmp_path / "bm25"), "--top-k", "30"]) == 0
    metrics = _check_outputs(tmp_path / "bm25", tiny_beir_dir)
    assert metrics["k1"] == 1.5 and metrics["b"] == 0.75 and metrics["split"] == "test"
    assert metrics["nDCG@10"] > 0.5  # queries share their topic words with the relevant documents
    assert max(len(d) for d in read_run(tmp_path / "bm25" / "run.trec").values()) <= 30
    assert "BM25 on" in capsys.readouterr().out


def test_evaluate_command(tiny_model_dir, tiny_beir_dir, tmp_path, capsys):
    out = tmp_path / "dense"
    assert main(["evaluate", "--model", str(tiny_model_dir), "--data", str(tiny_beir_dir), "--out", str(out),
                 "--batch-size", "8"]) == 0
    metrics = _check_outputs(out, tiny_beir_dir)
    assert metrics["model"] == str(tiny_model_dir)
    # the run is exact search over the model's embeddings
    data = load_dataset(tiny_beir_dir, "test")
    encoder = BiEncoder.from_pretrained(tiny_model_dir).eval()
    qids, dids = list(data.judged_queries), list(data.corpus)
    scores = (encoder.encode_texts([data.queries[q] for q in qids], True)
              @ encoder.encode_texts([data.corpus[d].full_text for d in dids], False).T)
    run = read_run(out / "run.trec")
    for row, qid in enumerate(qids):
        assert len(run[qid]) == len(dids)  # top-k 100 > 36 documents
        for doc, score in run[qid].items():
            assert score == pytest.approx(float(scores[row, dids.index(doc)]), abs=1e-5)


def _bad_corpus(tiny_beir_dir, tmp_path) -> tuple[Path, Path]:
    data_dir = tmp_path / "bad"
    shutil.copytree(tiny_beir_dir, data_dir)
    lines = (data_dir / "corpus.jsonl").read_text().splitlines()
    lines[4] = json.dumps({"_id": "d_broken", "title": "no text here"})
    (data_dir / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    return data_dir, data_dir / "corpus.jsonl"


def test_malformed_corpus_is_one_line_and_exit_code_2(tiny_beir_dir, tmp_path, capsys):
    data_dir, corpus = _bad_corpus(tiny_beir_dir, tmp_path)
    assert main(["bm25", "--data", str(data_dir), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"research: error: {corpus}:5: field 'text' missing\n"
    assert not (tmp_path / "out").exists()


def test_subprocess_exit_codes(tiny_beir_dir, tmp_path):
    data_dir, corpus = _bad_corpus(tiny_beir_dir, tmp_path)
    exe = Path(sys.executable).with_name("research")
    assert exe.is_file(), "the `research` script is not installed in the environment"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([str(exe), "bm25", "--data", str(data_dir), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [f"research: error: {corpus}:5: field 'text' missing"], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


# ------------------------------------------------------------------ research fit
FIT_YAML = """\
seed_everything: 5
run_dir: {run_dir}
evaluate_before_fit: true
trainer:
  max_steps: 3
  accelerator: cpu
  devices: 1
  enable_progress_bar: false
  enable_model_summary: false
  enable_checkpointing: false
  num_sanity_val_steps: 0
  limit_val_batches: 0
  log_every_n_steps: 1
model:
  class_path: modules.BiEncoderModule
  init_args:
    model: {model}
    lr: 1.0e-3
    warmup_ratio: 0.0
    loss:
      class_path: research.losses.InfoNCE
data:
  class_path: datamodules.RetrievalDataModule
  init_args:
    data: {data}
    train_split: train
    eval_split: test
    batch_size: 8
    eval_batch_size: 16
    num_negatives: 1
"""


def test_fit_writes_the_run_directory(tiny_model_dir, tiny_beir_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")  # CSV logger
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    config = tmp_path / "tiny.yaml"
    config.write_text(FIT_YAML.format(run_dir=run_dir, model=tiny_model_dir, data=tiny_beir_dir))
    assert main(["fit", "--config", str(config)]) == 0

    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["seed_everything"] == 5
    assert resolved["trainer"]["max_steps"] == 3
    assert resolved["model"]["class_path"] == "modules.BiEncoderModule"
    assert resolved["model"]["init_args"]["model"] == str(tiny_model_dir)
    assert resolved["model"]["init_args"]["temperature"] == 0.05  # defaults are filled in
    assert resolved["data"]["init_args"]["data"] == str(tiny_beir_dir)

    info = json.loads((run_dir / "run_info.json").read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO)
    assert info["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert info["seed"] == 5
    assert info["packages"]["torch"] == metadata.version("torch")
    assert info["packages"]["lightning"] == metadata.version("lightning")

    trained = BiEncoder.from_pretrained(run_dir / "model")
    initial = BiEncoder.from_pretrained(tiny_model_dir)
    assert trained.state_dict().keys() == initial.state_dict().keys()
    assert any(not torch.equal(v, initial.state_dict()[k]) for k, v in trained.state_dict().items())

    before = json.loads((run_dir / "eval_before" / "metrics.json").read_text())
    after = json.loads((run_dir / "eval_after" / "metrics.json").read_text())
    assert list(before)[:4] == KEYS and list(after)[:4] == KEYS
    _check_outputs(run_dir / "eval_before", tiny_beir_dir)
    _check_outputs(run_dir / "eval_after", tiny_beir_dir)
    # eval_after is the saved model's evaluation; eval_before the starting model's
    assert main(["evaluate", "--model", str(run_dir / "model"), "--data", str(tiny_beir_dir), "--out",
                 str(tmp_path / "check")]) == 0
    check = json.loads((tmp_path / "check" / "metrics.json").read_text())
    for key in KEYS:
        assert after[key] == pytest.approx(check[key], abs=1e-6)
    assert read_run(run_dir / "eval_after" / "run.trec").keys() == read_run(tmp_path / "check" / "run.trec").keys()

    log = (run_dir / "metrics.csv").read_text().splitlines()
    assert "train/loss" in log[0].split(",")
    out = capsys.readouterr().out
    assert "before fit" in out and "after fit" in out


# ------------------------------------------------------------------ evaluation tools
def test_dense_search_equals_brute_force_top_k():
    gen = torch.Generator().manual_seed(0)
    queries, docs = torch.randn(7, 16, generator=gen), torch.randn(60, 16, generator=gen)
    qids, dids = [f"q{i}" for i in range(7)], [f"doc{i}" for i in range(60)]
    run = dense_search(queries, docs, qids, dids, k=10, query_batch=3)
    scores = queries.double().numpy() @ docs.double().numpy().T
    assert list(run) == qids
    for row, qid in enumerate(qids):
        top = np.argsort(-scores[row])[:10]
        assert list(run[qid]) == [dids[j] for j in top]
        np.testing.assert_allclose(list(run[qid].values()), scores[row, top], rtol=1e-5, atol=1e-5)
    everything = dense_search(queries[:1], docs[:4], qids[:1], dids[:4], k=100)
    assert sorted(everything["q0"]) == sorted(dids[:4])


def test_save_evaluation_reads_back(tmp_path):
    run = {"q1": {"a": 3.25, "b": 1.0 / 3.0, "c": -0.5}, "q2": {"c": 2.0, "a": 1.5}, "q3": {"b": 0.1}}
    qrels = {"q1": {"b": 1, "c": 2}, "q2": {"a": 1}, "q3": {"x": 0}}
    evaluation = evaluate_run(run, qrels)
    save_evaluation(tmp_path / "out", evaluation, tag="unit", model="m")
    assert read_run(tmp_path / "out" / "run.trec") == run  # exact floats
    assert (tmp_path / "out" / "run.trec").read_text().splitlines()[0] == "q1 Q0 a 1 3.25 unit"
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics == {**evaluation.metrics.aggregate, "num_queries": 2, "skipped_queries_without_relevant": 1,
                       "model": "m"}
    # q1: relevant b (rank 2, grade 1) and c (rank 3, grade 2); q2: a at rank 2
    dcg = 1 / math.log2(3) + 2 / math.log2(4)
    idcg = 2 + 1 / math.log2(3)
    assert metrics["nDCG@10"] == pytest.approx((dcg / idcg + 1 / math.log2(3)) / 2)
    assert metrics["RR@10"] == pytest.approx((0.5 + 0.5) / 2)
    assert metrics["AP@100"] == pytest.approx(((1 / 2 + 2 / 3) / 2 + 0.5) / 2)
    assert json.loads((tmp_path / "out" / "per_query.json").read_text()) == evaluation.metrics.per_query
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["metrics.json", "per_query.json", "run.trec"]


BM25_CORPUS = {
    "a": Document("", "The rocket launch from the pad was delayed by the rocket crew"),
    "b": Document("Baking", "bread recipe with sugar and butter and more sugar"),
    "c": Document("Quasar", "zephyr observations of a distant quasar"),
    "d": Document("", "the rocket and the bread"),
    "e": Document("Notes", "observations of the weather and of the sea"),
}


def _dataset(queries: dict[str, str]) -> RetrievalDataset:
    return RetrievalDataset("bm25", Path("."), BM25_CORPUS, queries, {q: {"c": 1} for q in queries})


def test_bm25_top_document_shares_the_rare_terms():
    run = bm25_search(_dataset({"q": "Zephyr quasars observed", "r": "rocket delays"}), k=3, show_progress=False)
    assert next(iter(sorted(run["q"].items(), key=lambda x: -x[1])))[0] == "c"  # stemming: quasars -> quasar
    assert max(run["r"], key=run["r"].get) == "a"
    assert all(len(docs) == 3 for docs in run.values())


def test_bm25_scores_equal_hand_computed_lucene_bm25():
    k1, b = 1.2, 0.75
    config = BM25Config(k1=k1, b=b, stopwords=None, stemmer_language=None)
    query = "rocket observations quasar"
    run = bm25_search(_dataset({"q": query}), k=5, config=config, show_progress=False)

    def tokens(text: str) -> list[str]:  # bm25s' default splitting: lower case, words of 2+ characters
        return re.findall(r"(?u)\b\w\w+\b", text.lower())

    docs = {d: tokens(doc.full_text) for d, doc in BM25_CORPUS.items()}
    n, avgdl = len(docs), sum(map(len, docs.values())) / len(docs)

    def score(doc_id: str) -> float:
        tf_counts, dl, total = Counter(docs[doc_id]), len(docs[doc_id]), 0.0
        for term in tokens(query):
            df = sum(term in words for words in docs.values())
            tf = tf_counts[term]
            if tf:
                idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
                total += idf * tf / (tf + k1 * (1 - b + b * dl / avgdl))  # Lucene (>= 8): no (k1 + 1) factor
        return total

    expected = {d: score(d) for d in docs}
    assert expected["a"] > 0 and expected["c"] > expected["e"] > 0
    for doc_id, value in run["q"].items():
        assert value == pytest.approx(expected[doc_id], rel=1e-5), doc_id
    assert set(run["q"]) == set(docs)
    a_tokens = docs["a"]
    assert a_tokens.count("rocket") == 2 and len(a_tokens) == 12  # a hand check of the pair ("rocket", a)
    idf = math.log(1 + (5 - 2 + 0.5) / (2 + 0.5))
    assert run["q"]["a"] == pytest.approx(idf * 2 / (2 + k1 * (1 - b + b * 12 / avgdl)), rel=1e-5)


def test_a_command_leaves_no_process_group_behind(tiny_beir_dir, tmp_path):
    """Lightning destroys only NCCL groups at exit; a gloo group left to interpreter exit can abort the rank."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        data_dir, _ = _bad_corpus(tiny_beir_dir, tmp_path)
        assert main(["bm25", "--data", str(data_dir), "--out", str(tmp_path / "out")]) == 2  # on failure as well
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
