"""Corpus-embedding cache: an index directory per key; a hit encodes nothing and gives the same metrics; changed
weights, precision or corpus miss; turned off, nothing is kept and the metrics are the same."""

from __future__ import annotations

import dataclasses

import lightning as L
import torch

from datamodules.retrieval import RetrievalDataModule
from modules.bi_encoder import BiEncoderModule
from research.retrieval.index.manifest import read_manifest
from research.retrieval.index.search import ShardedIndex


def _evaluate(module, data) -> tuple[dict, int]:
    """Metrics of a test epoch and the number of corpus texts encoded in it."""
    encoded = []
    original = module.embed_documents

    def counting(texts):
        encoded.append(len(texts))
        return original(texts)

    module.embed_documents = counting  # instance attribute on our own test object
    L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).test(module, datamodule=data, verbose=False)
    del module.embed_documents
    return module.last_evaluation.metrics.aggregate, sum(encoded)


def _entries(root):
    return sorted(p for p in (root / "embeddings").iterdir() if p.is_dir()) if (root / "embeddings").is_dir() else []


def test_cache_hit_skips_corpus_encoding_and_changed_weights_miss(tiny_model_dir, tiny_beir_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RESEARCH_CACHE_DIR", str(tmp_path))
    data = RetrievalDataModule(str(tiny_beir_dir), train_split=None, eval_split="test", eval_batch_size=8)
    module = BiEncoderModule(model=str(tiny_model_dir))
    first, encoded_first = _evaluate(module, data)
    assert encoded_first == 36  # the tiny corpus, once
    [entry] = _entries(tmp_path)
    index = ShardedIndex(entry, verify=True)  # an ordinary, complete index directory
    assert len(index) == 36 and index.doc_ids() == list(data.eval_data.corpus)
    second, encoded_second = _evaluate(module, data)
    assert encoded_second == 0 and second == first
    with torch.no_grad():
        next(module.encoder.parameters()).add_(0.01)
    _, encoded_third = _evaluate(module, data)
    assert encoded_third == encoded_first and len(_entries(tmp_path)) == 2
    fingerprints = {read_manifest(e).model_fingerprint for e in _entries(tmp_path)}
    assert len(fingerprints) == 2
    uncached = BiEncoderModule(model=str(tiny_model_dir), cache_corpus_embeddings=False)
    reference, encoded = _evaluate(uncached, data)
    assert encoded == encoded_first and reference == first and len(_entries(tmp_path)) == 2  # scratch removed


def test_key_covers_precision_and_corpus(tiny_model_dir, tiny_beir_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RESEARCH_CACHE_DIR", str(tmp_path))
    data = RetrievalDataModule(str(tiny_beir_dir), train_split=None, eval_split="test", eval_batch_size=8)
    module = BiEncoderModule(model=str(tiny_model_dir))
    _evaluate(module, data)
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.test(module, datamodule=data, verbose=False)
    assert sorted(read_manifest(e).precision for e in _entries(tmp_path)) == ["32-true", "bf16-mixed"]
    corpus = dict(data.eval_data.corpus)  # another corpus: another entry
    corpus.popitem()
    data.eval_data = dataclasses.replace(data.eval_data, corpus=corpus)
    _, encoded = _evaluate(module, data)
    assert encoded == 35 and len(_entries(tmp_path)) == 3
