"""Cross-encoder model, CrossEncoderModule training and evaluation, rerank_run and ``research rerank``."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    BertTokenizerFast,
)

from datamodules.reranking import CandidateGroupsDataModule
from modules.cross_encoder import CrossEncoderModule
from research.cli.main import main
from research.data.batches import PairGroupBatch
from research.data.beir import load_dataset
from research.data.trec import read_run, truncate_run, write_run
from research.errors import ResearchError
from research.eval.evaluation import evaluate_run
from research.losses import CombinedLoss, ListwiseSoftmaxCE, PointwiseBCE, RankNet
from research.models.bi_encoder import BiEncoder, BiEncoderConfig
from research.models.cross_encoder import CrossEncoder, CrossEncoderConfig
from research.models.scorers import BiEncoderLoader, BiEncoderScorer, CrossEncoderLoader, load_scorer
from research.retrieval.fusion import choose_weight, interpolate
from research.retrieval.rerank import candidate_run, rerank_run

WORDS = ("the a of in and is to with cell cells protein proteins gene genes cancer tumor dna rna mouse mice human "
         "study effect effects blood heart brain risk disease drug treatment increase decrease level levels virus "
         "infection immune response bone growth").split()
DOCS = {
    "d1": ("Cancer genes", "the tumor gene is a cancer gene in human cells"),
    "d2": ("Heart risk", "blood level increase is a risk of heart disease"),
    "d3": ("Brain study", "a study of the brain in mice"),
    "d4": ("Virus infection", "the immune response to virus infection in human blood"),
    "d5": ("Bone growth", "bone growth and the effect of a drug in mice"),
    "d6": ("DNA and RNA", "dna rna and protein level in the cell"),
    "d7": ("Drug treatment", "treatment with the drug is a decrease of tumor growth"),
    "d8": ("Mouse genes", "mouse genes and proteins of the immune response"),
    "d9": ("Blood cells", "blood cells and the level of protein in human disease"),
    "d10": ("Risk study", "a study of risk and the effect of treatment on heart disease"),
}
QUERIES = {
    "q1": "cancer gene in tumor cells", "q2": "heart disease risk", "q3": "immune response to virus",
    "q4": "drug effect on growth", "q5": "protein levels in blood", "q6": "brain of mice",
}
QRELS = {"train": {"q1": {"d1": 1}, "q2": {"d2": 1, "d10": 1}, "q3": {"d4": 1}},
         "test": {"q4": {"d7": 1, "d5": 1}, "q5": {"d9": 1}, "q6": {"d3": 1}}}


def write_beir(root: Path) -> Path:
    (root / "qrels").mkdir(parents=True)
    with open(root / "corpus.jsonl", "w") as f:
        for doc_id, (title, text) in DOCS.items():
            f.write(json.dumps({"_id": doc_id, "title": title, "text": text}) + "\n")
    with open(root / "queries.jsonl", "w") as f:
        for query_id, text in QUERIES.items():
            f.write(json.dumps({"_id": query_id, "text": text}) + "\n")
    for split, qrels in QRELS.items():
        rows = [f"{q}\t{d}\t{g}" for q, docs in qrels.items() for d, g in docs.items()]
        (root / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(rows) + "\n")
    return root


def tiny_tokenizer(directory: Path) -> BertTokenizerFast:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizerFast(str(directory / "vocab.txt"))


def tiny_config(tokenizer) -> BertConfig:
    return BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      vocab_size=len(tokenizer), max_position_embeddings=128, initializer_range=0.2, num_labels=1,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # no dropout: loss curves are smooth


def tiny_encoder_dir(directory: Path, seed: int = 0) -> Path:
    """A plain BERT encoder (no classification head), as a pretrained checkpoint would be."""
    tokenizer = tiny_tokenizer(directory)
    torch.manual_seed(seed)
    BertModel(tiny_config(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_cross_encoder(directory: Path, max_length: int = 32, query_max_length: int = 8, seed: int = 0) -> CrossEncoder:
    tokenizer = tiny_tokenizer(directory)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_config(tokenizer)).eval()
    return CrossEncoder(model, tokenizer, CrossEncoderConfig(max_length=max_length, query_max_length=query_max_length))


@pytest.fixture
def beir(tmp_path) -> Path:
    return write_beir(tmp_path / "tiny")


@pytest.fixture
def ce_dir(tmp_path) -> Path:
    directory = tmp_path / "ce"
    tiny_cross_encoder(tmp_path / "ce_src").save_pretrained(directory)
    return directory


PAIRS_Q = ["cancer gene in tumor cells", "heart disease risk", "the brain", "drug effect on growth of bone in mice"]
PAIRS_D = [DOCS["d1"][1], DOCS["d2"][1] + " " + DOCS["d10"][1], "mice", " ".join(DOCS[d][1] for d in ("d5", "d7", "d3"))]


# ---------------------------------------------------------------- the model
def test_save_load_round_trip_is_exact(tmp_path):
    model = tiny_cross_encoder(tmp_path / "src")
    before = model.score(PAIRS_Q, PAIRS_D)
    model.save_pretrained(tmp_path / "saved")
    loaded = CrossEncoder.from_pretrained(tmp_path / "saved").eval()
    assert loaded.config == model.config
    assert torch.equal(loaded.score(PAIRS_Q, PAIRS_D), before)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert before.std() > 1e-3  # distinct scores, so the comparisons above mean something


def test_scores_equal_the_hf_logits_and_do_not_depend_on_batching(tmp_path):
    model = tiny_cross_encoder(tmp_path / "src")
    model.save_pretrained(tmp_path / "saved")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved").eval()
    tokenizer = BertTokenizerFast.from_pretrained(tmp_path / "saved")
    one_by_one = []
    for q, d in zip(PAIRS_Q, PAIRS_D):
        inputs = tokenizer(q, d, truncation="only_second", max_length=32, return_tensors="pt")
        with torch.no_grad():
            one_by_one.append(hf(**inputs).logits[0, 0])
    expected = torch.stack(one_by_one)
    torch.testing.assert_close(model.score(PAIRS_Q, PAIRS_D, batch_size=3), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.score_pairs(PAIRS_Q, PAIRS_D, batch_size=1), expected, atol=1e-5, rtol=1e-5)


def test_sentence_transformers_loads_the_directory_with_identical_logits(tmp_path):
    from sentence_transformers import CrossEncoder as STCrossEncoder

    model = tiny_cross_encoder(tmp_path / "src", max_length=24)  # PAIRS_D[1] and [3] are truncated
    model.save_pretrained(tmp_path / "saved")
    ours = model.score(PAIRS_Q, PAIRS_D)
    st = STCrossEncoder(str(tmp_path / "saved"), device="cpu")
    pairs = list(zip(PAIRS_Q, PAIRS_D))
    # sentence-transformers 6.2 applies Sigmoid by default when num_labels == 1 unless the directory says otherwise:
    # compare raw logits explicitly, then check that our directory makes identity the default
    raw = st.predict(pairs, activation_fn=nn.Identity(), convert_to_tensor=True, batch_size=2).cpu()
    torch.testing.assert_close(raw, ours, atol=1e-5, rtol=1e-5)
    assert isinstance(st.activation_fn, nn.Identity)
    torch.testing.assert_close(st.predict(pairs, convert_to_tensor=True).cpu(), ours, atol=1e-5, rtol=1e-5)
    assert st.preprocess(pairs)["input_ids"].shape[1] == 24


def test_truncation_keeps_the_query_and_cuts_the_document(tmp_path):
    model = tiny_cross_encoder(tmp_path / "src", max_length=16, query_max_length=6)
    tok = model.tokenizer
    query, document = "heart disease risk", " ".join(["blood cells"] * 30)
    ids = model.tokenize([query], [document])["input_ids"][0].tolist()
    q_ids = tok(query, add_special_tokens=False)["input_ids"]
    assert len(ids) == 16
    assert ids[:len(q_ids) + 2] == [tok.cls_token_id, *q_ids, tok.sep_token_id]
    assert ids[-1] == tok.sep_token_id and ids.count(tok.sep_token_id) == 2
    long_query = "the cancer gene in tumor cells and the heart disease risk"
    ids = model.tokenize([long_query], [document])["input_ids"][0].tolist()
    cut = tok(long_query, add_special_tokens=False)["input_ids"][:6]
    assert ids[:8] == [tok.cls_token_id, *cut, tok.sep_token_id] and len(ids) == 16
    with pytest.raises(ValueError):
        CrossEncoderConfig(max_length=16, query_max_length=14)


def test_an_encoder_without_head_gets_a_fresh_single_logit_head(tmp_path):
    model = CrossEncoder.from_pretrained(tiny_encoder_dir(tmp_path / "enc"), max_length=32, query_max_length=8)
    assert model.model.config.num_labels == 1
    assert model.score(PAIRS_Q[:2], PAIRS_D[:2]).shape == (2,)


# ---------------------------------------------------------------- rerank_run
def brute_force_rerank(score_one, data, candidates, top_k):
    """Rescore the top_k of each query one pair at a time."""
    run = {}
    for qid, docs in candidates.items():
        top = sorted(docs.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)[:top_k]
        run[qid] = {d: float(score_one(data.queries[qid], data.corpus[d].full_text)) for d, _ in top}
    return run


def assert_runs_close(a, b, tol=1e-5):
    assert a.keys() == b.keys()
    for qid in a:
        assert a[qid].keys() == b[qid].keys(), qid
        for doc in a[qid]:
            assert abs(a[qid][doc] - b[qid][doc]) < tol, (qid, doc)


CANDIDATES = {"q4": {f"d{i}": 10.0 - i for i in range(1, 11)}, "q5": {"d9": 3.0, "d2": 2.0, "d6": 1.0},
              "q6": {"d3": 1.0, "d8": 1.0, "d5": 0.5}}


def test_rerank_run_matches_one_pair_at_a_time(beir, tmp_path):
    data = load_dataset(beir, "test")
    model = tiny_cross_encoder(tmp_path / "src")
    run = rerank_run(model, data, CANDIDATES, top_k=4, batch_size=3)
    expected = brute_force_rerank(lambda q, d: model.score([q], [d])[0], data, CANDIDATES, top_k=4)
    assert_runs_close(run, expected)
    assert set(run["q4"]) == {"d1", "d2", "d3", "d4"} and set(run["q6"]) == {"d3", "d8", "d5"}


def test_rerank_run_with_the_bi_encoder_scorer(beir, tmp_path):
    data = load_dataset(beir, "test")
    tokenizer = tiny_tokenizer(tmp_path / "bi")
    torch.manual_seed(1)
    encoder = BiEncoder(BertModel(tiny_config(tokenizer), add_pooling_layer=False).eval(), tokenizer, BiEncoderConfig())

    def one(q, d):
        with torch.no_grad():
            return float((encoder([q], is_query=True) * encoder([d], is_query=False)).sum())

    run = rerank_run(BiEncoderScorer(encoder), data, CANDIDATES, top_k=5, batch_size=2)
    assert_runs_close(run, brute_force_rerank(one, data, CANDIDATES, top_k=5))


def test_rerank_run_rejects_unknown_ids(beir, tmp_path):
    data = load_dataset(beir, "test")
    model = tiny_cross_encoder(tmp_path / "src")
    with pytest.raises(ResearchError, match="nope"):
        rerank_run(model, data, {"q4": {"nope": 1.0}}, top_k=5)
    with pytest.raises(ResearchError, match="qx"):
        rerank_run(model, data, {"qx": {"d1": 1.0}}, top_k=5)


# ---------------------------------------------------------------- the LightningModule
def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
                     enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0,
                     use_distributed_sampler=False, **kwargs)


def _datamodule(beir, **kwargs) -> CandidateGroupsDataModule:
    options = dict(train_candidates="bm25", group_size=4, negative_rank_min=1, negative_rank_max=10, batch_size=2,
                   eval_candidates="bm25", eval_top_k=5, eval_batch_size=4)
    return CandidateGroupsDataModule(str(beir), **{**options, **kwargs})


def _fixed_loss(module: CrossEncoderModule, batch: PairGroupBatch) -> float:
    """The loss on ``batch`` without dropout; the module's mode is left as it was."""
    was_training = module.training
    module.eval()
    with torch.no_grad():
        loss = float(module.loss(module.score_batch(batch), batch.targets, batch.mask))
    module.train(was_training)
    return loss


def test_training_decreases_the_loss_and_logs_each_term(beir, ce_dir):
    loss = CombinedLoss([ListwiseSoftmaxCE(), PointwiseBCE(), RankNet()], [1.0, 0.5, 0.5])
    module = CrossEncoderModule(model=str(ce_dir), loss=loss, lr=3e-3, warmup_ratio=0.0)
    assert all(m.training for m in module.modules())  # dropout on while training, though from_pretrained returns eval mode
    data = _datamodule(beir)
    data.setup("fit")
    batch = data._train_set.collate([data._train_set[(0, i)] for i in range(len(data._train_set))])
    assert batch.targets.shape == (4, 4)
    start = _fixed_loss(module, batch)
    trainer = _trainer(max_steps=12)
    trainer.fit(module, datamodule=data)
    assert _fixed_loss(module, batch) < 0.7 * start
    logged = set(trainer.logged_metrics)
    assert {"train/loss", "train/ListwiseSoftmaxCE", "train/PointwiseBCE", "train/RankNet"} <= logged


def test_module_evaluation_reranks_the_candidates_like_rerank_run(beir, ce_dir, tmp_path):
    module = CrossEncoderModule(model=str(ce_dir))
    data = _datamodule(beir)
    _trainer().test(module, datamodule=data, verbose=False)
    evaluation = module.last_evaluation
    assert evaluation is not None and evaluation.metrics.num_queries == 3
    test_data = load_dataset(beir, "test")
    bm25 = candidate_run("bm25", test_data, 5, list(test_data.judged_queries))
    expected = rerank_run(CrossEncoder.from_pretrained(ce_dir).eval(), test_data, bm25, top_k=5)
    assert_runs_close(evaluation.run, expected)
    assert evaluation.metrics.aggregate == evaluate_run(expected, test_data.qrels).metrics.aggregate
    module.save_pretrained(tmp_path / "saved")
    assert CrossEncoderLoader().recognizes(tmp_path / "saved")


# ---------------------------------------------------------------- research rerank
def test_research_rerank_end_to_end(beir, ce_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["rerank", "--model", str(ce_dir), "--data", str(beir), "--split", "test", "--candidates", "bm25",
                 "--top-k", "5", "--out", str(out), "--batch-size", "4"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "nDCG@10" in printed and "candidates (bm25, top 5)" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["scorer"] == "CrossEncoder" and metrics["num_queries"] == 3 and "nDCG@10" in metrics["candidates_metrics"]
    assert set(json.loads((out / "per_query.json").read_text())) == {"q4", "q5", "q6"}
    run = read_run(out / "run.trec")
    assert all(len(docs) <= 5 for docs in run.values())

    data = load_dataset(beir, "test")
    write_run(tmp_path / "cands.trec", CANDIDATES)
    out2 = tmp_path / "out2"
    assert main(["rerank", "--model", str(ce_dir), "--data", str(beir), "--candidates", str(tmp_path / "cands.trec"),
                 "--top-k", "3", "--out", str(out2), "--interpolate", "0.5"]) == 0
    model = CrossEncoder.from_pretrained(ce_dir).eval()
    reranked = rerank_run(model, data, CANDIDATES, top_k=3)
    assert_runs_close(read_run(out2 / "run.trec"), reranked)
    assert_runs_close(read_run(out2 / "interpolated" / "run.trec"), interpolate(reranked, truncate_run(CANDIDATES, 3), 0.5))
    assert json.loads((out2 / "interpolated" / "metrics.json").read_text())["weight"] == 0.5


def test_research_rerank_chooses_the_interpolation_weight_on_another_split(beir, ce_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["rerank", "--model", str(ce_dir), "--data", str(beir), "--split", "test", "--top-k", "5",
                 "--out", str(out), "--interpolate-on", "train"]) == 0
    model = CrossEncoder.from_pretrained(ce_dir).eval()
    splits = {}
    for split in ("train", "test"):
        data = load_dataset(beir, split)
        candidates = truncate_run(candidate_run("bm25", data, 5, list(data.judged_queries)), 5)
        splits[split] = (data, candidates, rerank_run(model, data, candidates, top_k=5))
    weight, curve = choose_weight(splits["train"][2], splits["train"][1], splits["train"][0].qrels)
    fused = json.loads((out / "interpolated" / "metrics.json").read_text())
    assert fused["weight"] == weight and fused["weight_chosen_on"] == "train"
    assert fused["weight_curve"] == pytest.approx({f"{w:g}": v for w, v in curve.items()})
    _, test_candidates, test_run = splits["test"]
    assert_runs_close(read_run(out / "interpolated" / "run.trec"), interpolate(test_run, test_candidates, weight))
    assert set(json.loads((out / "interpolated" / "per_query.json").read_text())) == {"q4", "q5", "q6"}
    assert f"interpolation weight chosen on train (3 queries, nDCG@10): {weight:g}" in capsys.readouterr().out

    assert main(["rerank", "--model", str(ce_dir), "--data", str(beir), "--split", "test",
                 "--out", str(tmp_path / "same"), "--interpolate-on", "test"]) == 2
    assert "chosen on another split" in capsys.readouterr().err and not (tmp_path / "same").exists()
    assert main(["rerank", "--model", str(ce_dir), "--data", str(beir), "--split", "test",
                 "--out", str(tmp_path / "nodev"), "--interpolate-on", "dev"]) == 2
    assert not (tmp_path / "nodev").exists()


def test_research_rerank_indexes_the_corpus_once_for_both_splits(beir, ce_dir, tmp_path, monkeypatch):
    from research.retrieval import bm25

    built = []

    class CountedIndex(bm25.BM25Index):
        def __init__(self, data, *args, **kwargs):
            built.append(len(data.corpus))
            super().__init__(data, *args, **kwargs)

    monkeypatch.setattr(bm25, "BM25Index", CountedIndex)
    assert main(["rerank", "--model", str(ce_dir), "--data", str(beir), "--split", "test", "--top-k", "5",
                 "--out", str(tmp_path / "out"), "--interpolate-on", "train"]) == 0
    assert built == [len(load_dataset(beir, "test").corpus)]  # dev and test share the corpus, so one index
    # a sliced corpus holds its split's judged documents, so each split gets its own
    assert main(["rerank", "--model", str(ce_dir), "--data", str(beir), "--split", "test", "--top-k", "5",
                 "--max-docs", "4", "--out", str(tmp_path / "sliced"), "--interpolate-on", "train"]) == 0
    assert len(built) == 3


def test_research_rerank_detects_the_model_kind(beir, tmp_path, capsys):
    tokenizer = tiny_tokenizer(tmp_path / "bi_src")
    torch.manual_seed(2)
    encoder = BiEncoder(BertModel(tiny_config(tokenizer), add_pooling_layer=False), tokenizer, BiEncoderConfig())
    encoder.save_pretrained(tmp_path / "bi")
    assert BiEncoderLoader().recognizes(tmp_path / "bi") and not CrossEncoderLoader().recognizes(tmp_path / "bi")
    assert isinstance(load_scorer(tmp_path / "bi"), BiEncoderScorer)
    assert main(["rerank", "--model", str(tmp_path / "bi"), "--data", str(beir), "--top-k", "4",
                 "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["scorer"] == "BiEncoderScorer"

    (tmp_path / "empty").mkdir()
    assert main(["rerank", "--model", str(tmp_path / "empty"), "--data", str(beir), "--out", str(tmp_path / "x")]) == 2
    assert "marker files" in capsys.readouterr().err


def test_research_fit_evaluates_before_and_after_and_saves_the_model(beir, ce_dir, tmp_path, capsys):
    config = tmp_path / "ce.yaml"
    config.write_text(f"""
seed_everything: 0
evaluate_before_fit: true
test_after_fit: true
trainer: {{max_steps: 3, accelerator: cpu, devices: 1, logger: false, enable_checkpointing: false,
          enable_progress_bar: false, enable_model_summary: false, limit_val_batches: 0, num_sanity_val_steps: 0}}
model:
  class_path: modules.CrossEncoderModule
  init_args: {{model: {ce_dir}, loss: {{class_path: research.losses.ListwiseSoftmaxCE}}, lr: 1.0e-3}}
data:
  class_path: datamodules.CandidateGroupsDataModule
  init_args: {{data: {beir}, group_size: 3, negative_rank_min: 1, negative_rank_max: 10, batch_size: 2, eval_top_k: 5}}
""")
    run_dir = tmp_path / "run"
    assert main(["fit", "--config", str(config), "--run_dir", str(run_dir)]) == 0
    for folder in ("eval_before", "eval_after"):
        metrics = json.loads((run_dir / folder / "metrics.json").read_text())
        assert metrics["num_queries"] == 3 and 0.0 <= metrics["nDCG@10"] <= 1.0
        assert all(len(docs) == 5 for docs in read_run(run_dir / folder / "run.trec").values())
    assert isinstance(load_scorer(run_dir / "model"), CrossEncoder)
    assert "after fit" in capsys.readouterr().out
