"""Loading without silent fallbacks (issue 17, section 4): sentence-transformers pooling modes this package does not
implement, LLM reranker heads missing from their file, and bi-encoder exports that load without warnings."""

from __future__ import annotations

import json
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_model_dir
from safetensors.torch import load_file, save_file
from test_llm_reranker import PAIRS, tiny_causal_lm
from test_llm_reranker import load as load_reranker
from test_llm_reranker import tiny_tokenizer as llm_tokenizer

from research.models.bi_encoder import CONFIG_NAME, BiEncoder
from research.models.llm_config import HEADS_FILE
from research.models.llm_reranker import LayerwiseLLMReranker
from research.models.pretrained import resolve_model

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


# ------------------------------------------------------------------ sentence-transformers pooling modes
def st_directory(tmp_path: Path, pooling: dict) -> Path:
    """A sentence-transformers directory over the tiny BERT whose ``1_Pooling/config.json`` holds ``pooling``."""
    directory = make_tiny_model_dir(tmp_path / "st")
    BiEncoder.from_pretrained(directory).save_pretrained(directory)
    (directory / CONFIG_NAME).unlink()  # only the sentence-transformers files say how to pool
    (directory / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **pooling}))
    return directory


@pytest.mark.parametrize(("pooling", "unknown"), [
    ({"pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": True}, "max"),
    ({"pooling_mode_mean_sqrt_len_tokens": True}, "mean_sqrt_len_tokens"),
    ({"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}, "mean, max"),  # concatenated there
    ({"pooling_mode": "weightedmean"}, "weightedmean"),
    ({"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False}, "none"),
])
def test_unsupported_pooling_mode_is_refused_naming_the_file(tmp_path, pooling, unknown):
    directory = st_directory(tmp_path, pooling)
    with pytest.raises(ValueError) as error:
        BiEncoder.from_pretrained(directory)
    message = str(error.value)
    assert str(directory / "1_Pooling" / "config.json") in message and unknown in message, message
    assert BiEncoder.from_pretrained(directory, pooling="cls").config.pooling == "cls"  # an explicit choice wins


@pytest.mark.parametrize(("pooling", "ours"), [
    ({"pooling_mode": "lasttoken"}, "last"), ({"pooling_mode": ["cls"]}, "cls"), ({"pooling_mode": "mean"}, "mean"),
    ({"pooling_mode_lasttoken": True, "pooling_mode_mean_tokens": False}, "last"),
])
def test_sentence_transformers_pooling_modes_map_to_ours(tmp_path, pooling, ours):
    assert BiEncoder.from_pretrained(st_directory(tmp_path, pooling)).config.pooling == ours


# ------------------------------------------------------------------ LLM reranker heads
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("llama")
    tokenizer = llm_tokenizer()
    tiny_causal_lm("llama", len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_saved_heads_missing_from_their_file_are_refused(llama_dir, tmp_path):
    reranker = load_reranker(llama_dir, readout="heads", start_layer=2)
    reranker.save_pretrained(tmp_path / "saved")
    heads_file = tmp_path / "saved" / HEADS_FILE
    state = load_file(str(heads_file))
    assert any(".3." in key for key in state)
    save_file({k: v for k, v in state.items() if ".3." not in k}, str(heads_file))  # drop layer 3's norm and projection
    with pytest.raises(ValueError, match=r"layer_heads\.safetensors.*no head for layer 3"):
        LayerwiseLLMReranker.from_pretrained(tmp_path / "saved")
    heads_file.unlink()
    with pytest.raises(ValueError, match=r"layer_heads\.safetensors.*missing"):
        LayerwiseLLMReranker.from_pretrained(tmp_path / "saved")


def test_scoring_more_layers_than_were_saved_is_refused(llama_dir, tmp_path):
    reranker = load_reranker(llama_dir, readout="heads", start_layer=3)
    reranker.save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match=r"no head for layer 2"):
        LayerwiseLLMReranker.from_pretrained(tmp_path / "saved", start_layer=2)
    again = LayerwiseLLMReranker.from_pretrained(tmp_path / "saved").eval()  # the saved layers load as before
    queries, documents = [q for q, _ in PAIRS], [d for _, d in PAIRS]
    torch.testing.assert_close(again.score_layers(queries, documents), reranker.score_layers(queries, documents))


def test_a_plain_causal_lm_still_gets_fresh_heads(llama_dir):
    assert set(load_reranker(llama_dir, readout="heads", start_layer=2).heads.projections) == {"2", "3", "4"}


# ------------------------------------------------------------------ exports load without warnings
@contextmanager
def load_messages():
    """Every warning that loading prints: transformers' and sentence-transformers' loggers (which do not propagate to
    the root logger) and Python warnings."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    loggers = [logging.getLogger(name) for name in ("transformers", "sentence_transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield records
        records.extend(str(w.message) for w in caught)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


@pytest.mark.parametrize("base", ["tiny", MINILM])
def test_export_loads_in_transformers_and_sentence_transformers_without_warnings(tmp_path, base):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    base_dir = make_tiny_model_dir(tmp_path / "tiny") if base == "tiny" else resolve_model(base)
    with load_messages() as messages:
        AutoModel.from_pretrained(base_dir)
    assert messages == [], messages  # the base loads cleanly: so must its export
    encoder = BiEncoder.from_pretrained(base_dir)
    assert not any("pooler" in name for name, _ in encoder.named_parameters())  # still trained without a pooler
    encoder.save_pretrained(tmp_path / "export")
    with load_messages() as messages:
        model = AutoModel.from_pretrained(tmp_path / "export")
        st = SentenceTransformer(str(tmp_path / "export"), device="cpu")
    assert messages == [], messages
    reference = AutoModel.from_pretrained(base_dir)
    torch.testing.assert_close(model.pooler.dense.weight, reference.pooler.dense.weight, rtol=0, atol=0)
    texts = ["rocket orbit", "the moon and the star"]
    torch.testing.assert_close(st.encode(texts, convert_to_tensor=True).cpu(), encoder.eval().encode_texts(texts, False),
                               atol=1e-5, rtol=1e-5)
