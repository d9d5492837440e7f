"""BiEncoder (tiny random BERT) against brute-force references, sentence-transformers and transformers; the
BiEncoderModule's scoring, training and evaluation through its public behaviour."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_bert, tiny_tokenizer

from datamodules.retrieval import RetrievalDataModule
from research.data.batches import GroupBatch
from research.eval.metrics import compute_metrics
from research.losses import InfoNCE
from research.models.bi_encoder import CONFIG_NAME, BiEncoder, BiEncoderConfig
from research.models.pooling import LastTokenPooling, pooling_from_name

TEXTS = [
    "rocket",
    "the rocket reaches orbit around the moon and the star",
    "Bread and cheese soup : a recipe about the kitchen",
    "whale",
    "guitar piano song melody drum concert violin chord guitar piano song",
]


def load(model_dir, **overrides) -> BiEncoder:
    return BiEncoder.from_pretrained(model_dir, **overrides).eval()


def single_text_states(encoder: BiEncoder, text: str, is_query: bool) -> torch.Tensor:
    """Hidden states of one text run alone (no padding), tokenized directly by the tokenizer: ``[T, H]``."""
    cfg = encoder.config
    prefix = cfg.query_prefix if is_query else cfg.document_prefix
    max_length = cfg.query_max_length if is_query else cfg.document_max_length
    ids = encoder.tokenizer(prefix + text, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        return encoder.tower(is_query)(input_ids=ids["input_ids"]).last_hidden_state[0]


# ------------------------------------------------------------------ pooling, normalisation, prefixes, lengths
@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_pooling_equals_brute_force(tiny_model_dir, pooling):
    encoder = load(tiny_model_dir, pooling=pooling, normalize=False)
    assert encoder.config.pooling == pooling
    with torch.no_grad():
        batched = encoder(TEXTS, is_query=False)  # one padded batch
    pick = {"mean": lambda h: h.mean(0), "cls": lambda h: h[0], "last": lambda h: h[-1]}[pooling]
    expected = torch.stack([pick(single_text_states(encoder, t, False)) for t in TEXTS])
    torch.testing.assert_close(batched, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batched[0], batched[1])


def test_last_token_pooling_left_and_right_padding():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float).view(2, 4, 3)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    pool = LastTokenPooling()
    torch.testing.assert_close(pool(hidden, right), torch.stack([hidden[0, 1], hidden[1, 3]]))
    torch.testing.assert_close(pool(hidden, left), torch.stack([hidden[0, 3], hidden[1, 3]]))
    mean = pooling_from_name("mean")(hidden, right)
    torch.testing.assert_close(mean, torch.stack([hidden[0, :2].mean(0), hidden[1].mean(0)]))
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        pooling_from_name("max")


def test_normalize_on_and_off(tiny_model_dir):
    raw, unit = load(tiny_model_dir, normalize=False), load(tiny_model_dir, normalize=True)
    with torch.no_grad():
        a, b = raw(TEXTS, is_query=True), unit(TEXTS, is_query=True)
    torch.testing.assert_close(b.norm(dim=-1), torch.ones(len(TEXTS)))
    assert not torch.allclose(a.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-3)
    torch.testing.assert_close(b, a / a.norm(dim=-1, keepdim=True), atol=1e-6, rtol=1e-5)


def test_prefixes_are_prepended(tiny_model_dir):
    plain = load(tiny_model_dir, normalize=False)
    prefixed = load(tiny_model_dir, normalize=False, query_prefix="query : ", document_prefix="passage : ")
    with torch.no_grad():
        q = prefixed(TEXTS[:3], is_query=True)
        d = prefixed(TEXTS[:3], is_query=False)
        q_ref = plain([f"query : {t}" for t in TEXTS[:3]], is_query=True)
        d_ref = plain([f"passage : {t}" for t in TEXTS[:3]], is_query=False)
    torch.testing.assert_close(q, q_ref)
    torch.testing.assert_close(d, d_ref)
    assert not torch.allclose(q, d)
    ids = prefixed.tokenize(["rocket"], is_query=True)["input_ids"][0].tolist()
    assert prefixed.tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", "query", "[UNK]", "rocket", "[SEP]"]  # ":" is not in the vocabulary


def test_max_lengths_truncate(tiny_model_dir):
    encoder = load(tiny_model_dir, query_max_length=5, document_max_length=7)
    long = TEXTS[4]  # 11 words
    q = encoder.tokenize([long, "rocket"], is_query=True)
    d = encoder.tokenize([long, "rocket"], is_query=False)
    assert q["input_ids"].shape == (2, 5) and d["input_ids"].shape == (2, 7)
    full = encoder.tokenizer(long)["input_ids"]
    assert q["input_ids"][0].tolist() == full[:4] + [encoder.tokenizer.sep_token_id]
    assert d["input_ids"][0].tolist() == full[:6] + [encoder.tokenizer.sep_token_id]
    assert q["attention_mask"][1].tolist() == [1, 1, 1, 0, 0]
    with torch.no_grad():  # truncated text embeds as its first tokens would
        cut = encoder.tokenizer.decode(full[1:4])
        torch.testing.assert_close(encoder([long], True), encoder([cut], True), atol=1e-6, rtol=1e-5)


def test_token_cache_matches_fresh_tokenization(tiny_model_dir):
    encoder = load(tiny_model_dir, query_prefix="query : ", query_max_length=8)
    first = encoder.tokenize(TEXTS[:2], is_query=True)
    assert len(encoder._token_cache) == 2
    batch = [TEXTS[1], TEXTS[2], TEXTS[0], TEXTS[1], TEXTS[4]]  # cached, new, cached, repeated, new (truncated)
    cached = encoder.tokenize(batch, is_query=True)
    fresh = encoder.tokenizer([f"query : {t}" for t in batch], truncation=True, max_length=8, padding=True,
                              return_tensors="pt")
    assert torch.equal(cached["input_ids"], fresh["input_ids"])
    assert torch.equal(cached["attention_mask"], fresh["attention_mask"])
    again = encoder.tokenize(TEXTS[:2], is_query=True)
    assert torch.equal(again["input_ids"], first["input_ids"])
    # documents are cached apart from queries (no prefix for them)
    doc = encoder.tokenize([TEXTS[0]], is_query=False)["input_ids"][0].tolist()
    assert doc == encoder.tokenizer(TEXTS[0])["input_ids"]


# ------------------------------------------------------------------ saving: sentence-transformers, transformers, reload
@pytest.mark.parametrize(("pooling", "normalize", "prefixes"), [("mean", True, True), ("cls", False, False)])
def test_saved_directory_loads_in_sentence_transformers(tiny_model_dir, tmp_path, pooling, normalize, prefixes):
    from sentence_transformers import SentenceTransformer

    encoder = load(tiny_model_dir, pooling=pooling, normalize=normalize, query_prefix="query : " if prefixes else "",
                   document_prefix="passage : " if prefixes else "", document_max_length=32)
    encoder.save_pretrained(tmp_path / "model")
    ours_q = encoder.encode_texts(TEXTS, is_query=True, batch_size=2)
    ours_d = encoder.encode_texts(TEXTS, is_query=False, batch_size=2)
    st = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    assert st.max_seq_length == 32
    st_q = st.encode(TEXTS, prompt_name="query", convert_to_tensor=True, batch_size=3)
    st_d = st.encode(TEXTS, prompt_name="document", convert_to_tensor=True, batch_size=3)
    torch.testing.assert_close(st_q.cpu(), ours_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st_d.cpu(), ours_d, atol=1e-5, rtol=1e-5)
    if prefixes:
        assert not torch.allclose(ours_q, ours_d)


def test_saved_directory_loads_in_transformers_with_mean_pooling(tiny_model_dir, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    encoder = load(tiny_model_dir, pooling="mean", normalize=True)
    encoder.save_pretrained(tmp_path / "model")
    model = AutoModel.from_pretrained(tmp_path / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    inputs = tokenizer(TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    reference = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(encoder.encode_texts(TEXTS, is_query=False), reference, atol=1e-5, rtol=1e-5)


def test_reload_is_exact(tiny_model_dir, tmp_path):
    encoder = load(tiny_model_dir, pooling="cls", normalize=False, query_prefix="q : ", query_max_length=9,
                   document_max_length=33)
    encoder.save_pretrained(tmp_path / "model")
    again = load(tmp_path / "model")
    assert again.config == encoder.config
    assert json.loads((tmp_path / "model" / CONFIG_NAME).read_text())["pooling"] == "cls"
    a, b = encoder.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for is_query in (True, False):
        assert torch.equal(encoder.encode_texts(TEXTS, is_query), again.encode_texts(TEXTS, is_query))


def test_sentence_transformers_directory_config_is_read(tiny_model_dir, tmp_path):
    """Without our own config file, pooling, normalisation, prompts and max length come from the ST files."""
    encoder = load(tiny_model_dir, pooling="last", normalize=False, query_prefix="query : ", document_prefix="doc : ",
                   document_max_length=40)
    encoder.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / CONFIG_NAME).unlink()
    config = load(tmp_path / "model").config
    assert (config.pooling, config.normalize, config.query_prefix, config.document_prefix) == (
        "last", False, "query : ", "doc : ")
    assert config.query_max_length == config.document_max_length == 40  # ST's max_seq_length cuts queries too
    assert load(tmp_path / "model", query_max_length=12).config.query_max_length == 12


def test_separate_towers_save_and_reload(tiny_model_dir, tmp_path):
    tokenizer = tiny_tokenizer(tmp_path / "vocab")
    config = BiEncoderConfig(shared_towers=False, normalize=False)
    encoder = BiEncoder(tiny_bert(0, with_pooler=False), tokenizer, config, document_encoder=tiny_bert(1, with_pooler=False))
    q, d = encoder.encode_texts(TEXTS, True), encoder.encode_texts(TEXTS, False)
    assert not torch.allclose(q, d, atol=1e-3)  # different towers
    encoder.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "document_encoder" / "config.json").is_file()
    again = load(tmp_path / "model")
    assert again.config.shared_towers is False and again.document_encoder is not None
    assert torch.equal(again.encode_texts(TEXTS, True), q)
    assert torch.equal(again.encode_texts(TEXTS, False), d)
    with pytest.raises(ValueError, match="shared_towers=True"):
        BiEncoder(tiny_bert(0), tokenizer, BiEncoderConfig(), document_encoder=tiny_bert(1))


def test_bert_pooler_is_not_created(tiny_model_dir):
    encoder = BiEncoder.from_pretrained(tiny_model_dir)  # the directory's weights include a pooler
    names = [n for n, _ in encoder.named_parameters()]
    assert names and not any("pooler" in n for n in names)
    encoder.train()
    q, d = encoder(TEXTS[:3], is_query=True), encoder(TEXTS[2:], is_query=False)
    (q @ d.T).logsumexp(-1).sum().backward()
    without = [n for n, p in encoder.named_parameters() if p.grad is None]
    assert without == []


# ------------------------------------------------------------------ BiEncoderModule
def _module(tiny_model_dir, **kwargs):
    from modules.bi_encoder import BiEncoderModule

    return BiEncoderModule(model=str(tiny_model_dir), **kwargs)


def _batch_with_shared_positive() -> GroupBatch:
    doc_ids = [["d_space_1", "d_food_0"], ["d_space_1", "d_music_2"], ["d_ocean_3", "d_food_0"]]
    return GroupBatch(
        query_ids=["qa", "qb", "qc"],
        queries=["rocket orbit", "moon star launch", "whale reef"],
        doc_ids=doc_ids,
        documents=[[f"text of {d.replace('_', ' ')}" for d in row] for row in doc_ids],
        targets=torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]),
        positive_ids=[frozenset({"d_space_1"}), frozenset({"d_space_1", "d_space_4"}), frozenset({"d_ocean_3", "d_music_2"})],
    )


def test_score_batch_masks_other_rows_copies_of_my_positives(tiny_model_dir):
    module = _module(tiny_model_dir, temperature=0.5).eval()
    batch = _batch_with_shared_positive()
    with torch.no_grad():
        scores, targets, mask = module.score_batch(batch)
        q = module.encoder(batch.queries, is_query=True)
        d = module.encoder([t for row in batch.documents for t in row], is_query=False)
    assert scores.shape == targets.shape == mask.shape == (3, 6)
    torch.testing.assert_close(scores, q @ d.T / 0.5, atol=1e-5, rtol=1e-5)
    expected_targets = torch.zeros(3, 6)
    expected_targets[0, 0] = expected_targets[1, 2] = expected_targets[2, 4] = 1.0
    assert torch.equal(targets, expected_targets)
    expected_mask = torch.ones(3, 6, dtype=torch.bool)
    expected_mask[0, 2] = False  # row 1's copy of d_space_1, row 0's positive
    expected_mask[1, 0] = False  # row 0's copy of d_space_1, row 1's positive
    expected_mask[2, 3] = False  # row 1's hard negative d_music_2 is judged relevant for row 2
    assert torch.equal(mask, expected_mask)
    loss = InfoNCE()(scores, targets, mask)
    logits = scores.masked_fill(~expected_mask, float("-inf"))
    reference = -torch.log_softmax(logits, -1)[[0, 1, 2], [0, 2, 4]].mean()
    torch.testing.assert_close(loss, reference)


def test_score_batch_without_in_batch_negatives(tiny_model_dir):
    module = _module(tiny_model_dir, in_batch_negatives=False, temperature=0.1).eval()
    batch = _batch_with_shared_positive()
    with torch.no_grad():
        scores, targets, mask = module.score_batch(batch)
        q = module.encoder(batch.queries, is_query=True)
        d = module.encoder([t for row in batch.documents for t in row], is_query=False).view(3, 2, -1)
    assert scores.shape == targets.shape == mask.shape == (3, 2)
    expected = torch.stack([d[i] @ q[i] for i in range(3)]) / 0.1
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-5)
    assert torch.equal(targets, batch.targets) and bool(mask.all())


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, **kwargs)


def test_a_few_training_steps_reduce_the_loss(tiny_model_dir, tiny_beir_dir):
    L.seed_everything(0, verbose=False)
    module = _module(tiny_model_dir, lr=2e-3, warmup_ratio=0.0, temperature=0.1)
    data = RetrievalDataModule(str(tiny_beir_dir), train_split="train", eval_split="test", num_negatives=1,
                               batch_size=8, seed=0)
    data.setup("fit")
    train_set = data._train_set
    fixed = train_set.collate([train_set[(0, i)] for i in range(0, len(train_set), 2)])

    def loss_on_fixed() -> float:
        module.eval()
        with torch.no_grad():
            return float(InfoNCE()(*module.score_batch(fixed)))

    class RecordBatches(L.Callback):
        def __init__(self) -> None:
            self.seen: dict[int, list[tuple[str, ...]]] = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.seen.setdefault(trainer.current_epoch, []).append(tuple(batch.query_ids))

    before = loss_on_fixed()
    start = {k: v.clone() for k, v in module.encoder.state_dict().items()}
    record = RecordBatches()
    _trainer(max_steps=12, callbacks=[record]).fit(module, datamodule=data)
    after = loss_on_fixed()
    assert module.trainer.global_step == 12
    # 48 items in batches of 8: two epochs of 6 batches, each epoch in its own order (the sampler gets set_epoch)
    assert sorted(record.seen) == [0, 1] and all(len(batches) == 6 for batches in record.seen.values())
    assert record.seen[0] != record.seen[1]
    assert sorted(q for b in record.seen[0] for q in b) == sorted(q for b in record.seen[1] for q in b)
    assert after < 0.8 * before, (before, after)
    changed = [k for k, v in module.encoder.state_dict().items() if not torch.equal(v, start[k])]
    assert any("encoder.layer.0" in k for k in changed)


def test_test_time_evaluation_equals_brute_force_search(tiny_model_dir, tiny_beir_dir):
    k = 20
    metrics = ("nDCG@10", "RR@10", "R@100", "AP@100", "P@5")
    module = _module(tiny_model_dir, eval_top_k=k, metrics=metrics)
    data = RetrievalDataModule(str(tiny_beir_dir), train_split=None, eval_split="test", eval_batch_size=7)
    _trainer().test(module, datamodule=data, verbose=False)
    evaluation = module.last_evaluation
    assert evaluation is not None

    eval_data = data.eval_data
    query_ids = list(eval_data.judged_queries)
    doc_ids = list(eval_data.corpus)
    module.encoder.eval()
    q = module.encoder.encode_texts([eval_data.queries[i] for i in query_ids], is_query=True).numpy()
    d = module.encoder.encode_texts([eval_data.corpus[i].full_text for i in doc_ids], is_query=False).numpy()
    scores = q.astype(np.float64) @ d.astype(np.float64).T
    brute = {}
    for row, qid in enumerate(query_ids):
        top = np.argsort(-scores[row], kind="stable")[:k]
        brute[qid] = {doc_ids[j]: float(scores[row, j]) for j in top}
    assert set(evaluation.run) == set(query_ids)
    for qid in query_ids:
        ours = sorted(evaluation.run[qid].items(), key=lambda x: -x[1])
        ref = sorted(brute[qid].items(), key=lambda x: -x[1])
        assert [doc for doc, _ in ours] == [doc for doc, _ in ref]
        np.testing.assert_allclose([s for _, s in ours], [s for _, s in ref], atol=1e-5)
    expected = compute_metrics(brute, eval_data.qrels, metrics=metrics)
    assert list(evaluation.metrics.aggregate) == list(metrics)
    for name in metrics:
        assert evaluation.metrics.aggregate[name] == pytest.approx(expected.aggregate[name], abs=1e-9)
    assert evaluation.metrics.num_queries == len(query_ids) == 12
    assert 0.0 < expected.aggregate["R@100"] <= 1.0
