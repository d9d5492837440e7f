"""Pair scorers: the protocol every relevance model implements, and loading one from a model directory.

A scorer is anything with ``score_pairs(queries, documents, batch_size) -> Tensor``: the cross-encoder, the
bi-encoder through :class:`BiEncoderScorer`, or the LLM reranker. :func:`load_scorer` finds which kind a directory
holds through :data:`SCORER_LOADERS`, one registry keyed on each kind's marker file (the config file its
``save_pretrained`` writes); a directory without any marker (a Hugging Face or sentence-transformers checkpoint) goes to
the first loader whose :meth:`ScorerLoader.recognizes` accepts it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from torch import Tensor

from research.errors import ResearchError
from research.models import bi_encoder, cross_encoder, llm_config
from research.models.bi_encoder import BiEncoder
from research.models.cross_encoder import CrossEncoder
from research.models.llm_reranker import LayerwiseLLMReranker
from research.models.pretrained import resolve_model


@runtime_checkable
class PairScorer(Protocol):
    """Scores ``(queries[i], documents[i])`` pairs; higher is more relevant. Returns float32 ``[N]`` on the CPU."""

    def score_pairs(self, queries: list[str], documents: list[str], batch_size: int = 32) -> Tensor: ...


class BiEncoderScorer:
    """A :class:`research.models.bi_encoder.BiEncoder` as a pair scorer: each distinct text is embedded once."""

    def __init__(self, encoder: BiEncoder) -> None:
        self.encoder = encoder

    def score_pairs(self, queries: list[str], documents: list[str], batch_size: int = 32) -> Tensor:
        if len(queries) != len(documents):
            raise ValueError(f"{len(queries)} queries but {len(documents)} documents")
        unique_queries, unique_docs = list(dict.fromkeys(queries)), list(dict.fromkeys(documents))
        query_emb = self.encoder.encode_texts(unique_queries, is_query=True, batch_size=batch_size)
        doc_emb = self.encoder.encode_texts(unique_docs, is_query=False, batch_size=batch_size)
        q_index = {t: i for i, t in enumerate(unique_queries)}
        d_index = {t: i for i, t in enumerate(unique_docs)}
        q = query_emb[[q_index[t] for t in queries]]
        d = doc_emb[[d_index[t] for t in documents]]
        return (q * d).sum(-1).float()


@dataclass
class ScorerOptions:
    """What ``research rerank`` lets a user override when loading any scorer."""

    max_length: int | None = None
    trust_remote_code: bool = False
    device: str = "cpu"


class ScorerLoader(Protocol):
    """Recognises one kind of model directory (first by its marker file) and loads it as a :class:`PairScorer`."""

    marker: str

    def recognizes(self, path: Path) -> bool: ...

    def load(self, path: Path, options: ScorerOptions) -> PairScorer: ...


class CrossEncoderLoader:
    """Our cross-encoder directories, and any Hugging Face ``*ForSequenceClassification`` directory."""

    marker = cross_encoder.CONFIG_NAME

    def recognizes(self, path: Path) -> bool:
        if (path / self.marker).is_file():
            return True
        config = path / "config.json"
        if not config.is_file():
            return False
        architectures = json.loads(config.read_text()).get("architectures") or []
        return any(str(a).endswith("ForSequenceClassification") for a in architectures)

    def load(self, path: Path, options: ScorerOptions) -> PairScorer:
        model = CrossEncoder.from_pretrained(path, trust_remote_code=options.trust_remote_code, max_length=options.max_length)
        return model.to(options.device).eval()


class BiEncoderLoader:
    """Our bi-encoder directories, and sentence-transformers embedding models (``modules.json`` with pooling)."""

    marker = bi_encoder.CONFIG_NAME

    def recognizes(self, path: Path) -> bool:
        if (path / self.marker).is_file():
            return True
        modules = path / "modules.json"
        return modules.is_file() and any(str(m.get("type", "")).endswith("Pooling") for m in json.loads(modules.read_text()))

    def load(self, path: Path, options: ScorerOptions) -> PairScorer:
        encoder = BiEncoder.from_pretrained(path, trust_remote_code=options.trust_remote_code,
                                            query_max_length=options.max_length, document_max_length=options.max_length)
        return BiEncoderScorer(encoder.to(options.device).eval())


class LLMRerankerLoader:
    """Our layer-wise LLM reranker directories (full weights, or a LoRA adapter over the recorded base model)."""

    marker = llm_config.CONFIG_NAME

    def recognizes(self, path: Path) -> bool:
        return (path / self.marker).is_file()

    def load(self, path: Path, options: ScorerOptions) -> PairScorer:
        model = LayerwiseLLMReranker.from_pretrained(path, trust_remote_code=options.trust_remote_code,
                                                     max_length=options.max_length)
        return model.to(options.device).eval()


# Marker file -> loader; a new scorer kind adds its loader here. The order is the one foreign directories (no marker
# file) are tried in, kept from before the registry so that such a directory loads as the same kind as it did.
SCORER_LOADERS: Mapping[str, ScorerLoader] = {
    loader.marker: loader for loader in (LLMRerankerLoader(), CrossEncoderLoader(), BiEncoderLoader())
}


def scorer_loader(path: Path, loaders: Mapping[str, ScorerLoader] = SCORER_LOADERS) -> ScorerLoader:
    """The loader of a model directory: the one whose marker file it holds, else the first that recognizes it."""
    found = next((loader for marker, loader in loaders.items() if (path / marker).is_file()), None)
    if found is None:
        found = next((loader for loader in loaders.values() if loader.recognizes(path)), None)
    if found is None:
        raise ResearchError(f"{path}: not a model directory any scorer loader recognizes "
                            f"(marker files: {', '.join(loaders)})")
    return found


def load_scorer(name_or_path: str | Path, options: ScorerOptions | None = None,
                loaders: Mapping[str, ScorerLoader] = SCORER_LOADERS) -> PairScorer:
    """The scorer a model directory (or packaged / hub name) holds (see :func:`scorer_loader`)."""
    path = resolve_model(name_or_path)
    return scorer_loader(path, loaders).load(path, options or ScorerOptions())
