"""Corpus-embedding cache: a hit skips corpus encoding and gives the same metrics; changed weights miss."""

from __future__ import annotations

import lightning as L
import torch

from datamodules.retrieval import RetrievalDataModule
from modules.bi_encoder import BiEncoderModule
from research.training.embedding_cache import EmbeddingCache


def _evaluate(module, data) -> tuple[dict, int]:
    calls = []
    original = module.encoder.forward

    def counting(texts, is_query):
        calls.append(is_query)
        return original(texts, is_query)

    module.encoder.forward = counting  # instance attribute on our own test object
    L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).test(module, datamodule=data, verbose=False)
    del module.encoder.forward
    return module.last_evaluation.metrics.aggregate, calls.count(False)


def test_cache_hit_skips_corpus_encoding_and_changed_weights_miss(tiny_model_dir, tiny_beir_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RESEARCH_CACHE_DIR", str(tmp_path))
    data = RetrievalDataModule(str(tiny_beir_dir), train_split=None, eval_split="test", eval_batch_size=8)
    module = BiEncoderModule(model=str(tiny_model_dir))
    first, encoded_first = _evaluate(module, data)
    assert encoded_first > 0 and len(list((tmp_path / "embeddings").glob("*.safetensors"))) == 1
    second, encoded_second = _evaluate(module, data)
    assert encoded_second == 0 and second == first
    with torch.no_grad():
        next(module.encoder.parameters()).add_(0.01)
    _, encoded_third = _evaluate(module, data)
    assert encoded_third == encoded_first and len(list((tmp_path / "embeddings").glob("*.safetensors"))) == 2
    uncached = BiEncoderModule(model=str(tiny_model_dir), cache_corpus_embeddings=False)
    reference, encoded = _evaluate(uncached, data)
    assert encoded == encoded_first and reference == first


def test_cache_round_trip(tmp_path):
    cache = EmbeddingCache(tmp_path)
    assert cache.load("k") is None
    cache.save("k", ["a", "b"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    ids, emb = cache.load("k")
    assert ids == ["a", "b"] and torch.equal(emb, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
