"""A cross-encoder: one relevance logit per (query, document) pair, saved so sentence-transformers loads it too."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from research.io import write_json
from research.models.batching import evaluating, in_length_order
from research.models.pretrained import resolve_model

CONFIG_NAME = "research_cross_encoder.json"
SENTENCE_TRANSFORMERS_TRANSFORMER = "sentence_transformers.base.modules.transformer.Transformer"
IDENTITY_ACTIVATION = "torch.nn.modules.linear.Identity"


@dataclass
class CrossEncoderConfig:
    """``max_length``: tokens of the whole pair; queries are first cut to ``query_max_length`` tokens."""

    max_length: int = 256
    query_max_length: int = 64

    def __post_init__(self) -> None:
        if self.query_max_length < 1 or self.max_length < self.query_max_length + 4:
            raise ValueError(f"need 1 <= query_max_length ({self.query_max_length}) and max_length ({self.max_length}) "
                             f">= query_max_length + 4, so that every pair keeps some document tokens")


class CrossEncoder(nn.Module):
    """``AutoModelForSequenceClassification`` with ``num_labels=1``: the raw logit is the pair's relevance score.

    Pairs are tokenized as ``[CLS] query [SEP] document [SEP]``, truncating only the document (``only_second``) to
    ``max_length``; a query longer than ``query_max_length`` tokens is cut first. Loading a plain encoder (e.g.
    ``all-MiniLM-L6-v2``) adds a randomly initialised classification head: such a model scores at random until trained.
    ``save_pretrained`` writes a directory that ``sentence_transformers.CrossEncoder(dir)`` loads with the same
    tokenization and an identity activation, so its ``predict`` returns these same logits.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: CrossEncoderConfig) -> None:
        super().__init__()
        if model.config.num_labels != 1:
            raise ValueError(f"a cross-encoder needs num_labels=1, the model has {model.config.num_labels}")
        self.model = model
        self.tokenizer = tokenizer
        self.config = config

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, trust_remote_code: bool = False, **overrides) -> CrossEncoder:
        """Load a saved cross-encoder, or start one from any encoder checkpoint (new head: random scores)."""
        path = resolve_model(name_or_path)
        saved = _read_config(path)
        config = CrossEncoderConfig(**{**saved, **{k: v for k, v in overrides.items() if v is not None}})
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        return cls(model, tokenizer, config)

    def save_pretrained(self, directory: str | Path) -> None:
        """Weights, tokenizer, our config, and the files ``sentence_transformers.CrossEncoder`` reads."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        write_json(directory / "modules.json", [{"idx": 0, "name": "0", "path": "", "type": SENTENCE_TRANSFORMERS_TRANSFORMER}])
        write_json(directory / "sentence_bert_config.json", {
            "transformer_task": "sequence-classification",
            "modality_config": {"text": {"method": "forward", "method_output_name": "logits"}},
            "module_output_name": "scores",
            "processing_kwargs": {"text": {"truncation": "only_second", "max_length": self.config.max_length}},
        })
        write_json(directory / "config_sentence_transformers.json", {
            "model_type": "CrossEncoder", "activation_fn": IDENTITY_ACTIVATION, "prompts": {}, "default_prompt_name": None,
        })
        write_json(directory / CONFIG_NAME, asdict(self.config))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def clip_queries(self, queries: list[str]) -> list[str]:
        """Each query cut to its first ``query_max_length`` tokens (unchanged when shorter)."""
        limit = self.config.query_max_length
        encoded = self.tokenizer(queries, add_special_tokens=False, truncation=True, max_length=limit + 1,
                                 return_offsets_mapping=self.tokenizer.is_fast)
        clipped = []
        for i, (query, ids) in enumerate(zip(queries, encoded["input_ids"])):
            if len(ids) <= limit:
                clipped.append(query)
            elif self.tokenizer.is_fast:
                clipped.append(query[:encoded["offset_mapping"][i][limit - 1][1]])
            else:
                clipped.append(self.tokenizer.decode(ids[:limit]))
        return clipped

    def tokenize(self, queries: list[str], documents: list[str]) -> dict[str, Tensor]:
        """Padded ``[CLS] query [SEP] document [SEP]`` inputs, only the document truncated."""
        if len(queries) != len(documents):
            raise ValueError(f"{len(queries)} queries but {len(documents)} documents")
        return dict(self.tokenizer(self.clip_queries(queries), documents, truncation="only_second",
                                   max_length=self.config.max_length, padding=True, return_tensors="pt"))

    def forward(self, queries: list[str], documents: list[str]) -> Tensor:
        """Relevance logits ``[N]`` of the pairs ``(queries[i], documents[i])``, with gradients."""
        inputs = {k: v.to(self.device) for k, v in self.tokenize(queries, documents).items()}
        return self.model(**inputs).logits.squeeze(-1)

    @torch.inference_mode()
    def score(self, queries: list[str], documents: list[str], batch_size: int = 32) -> Tensor:
        """Float32 CPU scores ``[N]`` in input order, computed in length-sorted batches (little padding)."""
        if len(queries) != len(documents):
            raise ValueError(f"{len(queries)} queries but {len(documents)} documents")
        with evaluating(self):
            return in_length_order(lambda idx: self([queries[i] for i in idx], [documents[i] for i in idx]),
                                   [len(q) + len(d) for q, d in zip(queries, documents)], batch_size)

    def score_pairs(self, queries: list[str], documents: list[str], batch_size: int = 32) -> Tensor:
        """The :class:`research.models.scorers.PairScorer` interface: :meth:`score`."""
        return self.score(queries, documents, batch_size)


def _read_config(path: Path) -> dict:
    """Our config when present; else the pair length a sentence-transformers directory gives, if any."""
    if (path / CONFIG_NAME).is_file():
        known = {f.name for f in fields(CrossEncoderConfig)}
        return {k: v for k, v in json.loads((path / CONFIG_NAME).read_text()).items() if k in known}
    config: dict = {}
    st_config = path / "sentence_bert_config.json"
    if st_config.is_file():
        saved = json.loads(st_config.read_text())
        length = (saved.get("processing_kwargs") or {}).get("text", {}).get("max_length") or saved.get("max_seq_length")
        if length:
            config["max_length"] = int(length)
    return config
