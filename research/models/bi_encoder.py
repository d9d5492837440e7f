"""A dense bi-encoder over a Hugging Face backbone, saved in sentence-transformers' directory format."""

from __future__ import annotations

import inspect
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from research.io import write_json
from research.models.batching import in_length_order
from research.models.pooling import POOLINGS, pooling_from_name, pooling_from_sentence_transformers
from research.models.pretrained import resolve_model

CONFIG_NAME = "research_bi_encoder.json"
DOCUMENT_TOWER = "document_encoder"


@dataclass
class BiEncoderConfig:
    pooling: str = "mean"
    normalize: bool = True
    query_prefix: str = ""
    document_prefix: str = ""
    query_max_length: int = 64
    document_max_length: int = 256
    shared_towers: bool = True


POOLER_STATE = "research_pooler_state"  # attribute of a backbone: the pooler weights its export writes back


def load_backbone(path: str | Path, trust_remote_code: bool = False) -> PreTrainedModel:
    """``AutoModel`` without BERT's pooler: an unused pooler leaves parameters without gradients, which breaks DDP.

    The pooler is loaded and then taken out, so the load reports what loading the base reports (no "unexpected
    pooler" keys), and its checkpoint weights are kept in the ``POOLER_STATE`` attribute, untrained: ``save_pretrained``
    writes them back, so that ``AutoModel`` and sentence-transformers load the export without "newly initialized"
    warnings. A checkpoint without pooler weights leaves nothing to keep (its export loads as the base does)."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    model_class = AutoModel._model_mapping.get(type(config), None) if not trust_remote_code else None
    if model_class is None or "add_pooling_layer" not in inspect.signature(model_class.__init__).parameters:
        return AutoModel.from_pretrained(path, trust_remote_code=trust_remote_code)
    model, info = AutoModel.from_pretrained(path, trust_remote_code=trust_remote_code, output_loading_info=True)
    pooler = getattr(model, "pooler", None)
    if isinstance(pooler, nn.Module):
        loaded = not any(key.startswith("pooler.") for key in info["missing_keys"])
        state = {f"pooler.{k}": v.detach().clone() for k, v in pooler.state_dict().items()} if loaded else {}
        model.pooler = None
        setattr(model, POOLER_STATE, state)
    return model


def save_backbone(model: PreTrainedModel, directory: Path) -> None:
    """``save_pretrained``, with the pooler weights :func:`load_backbone` kept aside, if any."""
    extra = getattr(model, POOLER_STATE, None)
    if not extra:
        model.save_pretrained(directory)
        return
    model.save_pretrained(directory, state_dict={**model.state_dict(), **extra})


class BiEncoder(nn.Module):
    """Query and document towers (shared by default) with pooling and optional L2 normalisation."""

    def __init__(
        self,
        query_encoder: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: BiEncoderConfig,
        document_encoder: PreTrainedModel | None = None,
    ) -> None:
        super().__init__()
        if config.shared_towers and document_encoder is not None:
            raise ValueError("shared_towers=True takes no separate document_encoder")
        self.query_encoder = query_encoder
        self.document_encoder = document_encoder
        self.tokenizer = tokenizer
        self.config = config
        self.pooling = pooling_from_name(config.pooling)
        self._token_cache: dict[tuple[bool, str], list[int]] = {}
        self.token_cache_size = 2_000_000

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path, *, trust_remote_code: bool = False, **overrides
    ) -> BiEncoder:
        """Load from a local dir, packaged weights or the hub; sentence-transformers dirs keep their pooling and prompts."""
        path = resolve_model(name_or_path)
        overrides = {k: v for k, v in overrides.items() if v is not None}
        config = BiEncoderConfig(**{**_read_config(path, read_pooling="pooling" not in overrides), **overrides})
        query_encoder = load_backbone(path, trust_remote_code)
        document_encoder = None
        if not config.shared_towers:
            tower = path / DOCUMENT_TOWER
            document_encoder = load_backbone(tower if tower.is_dir() else path, trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        return cls(query_encoder, tokenizer, config, document_encoder)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write a directory that ``SentenceTransformer(dir)`` and ``AutoModel`` load (query tower at the root)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_backbone(self.query_encoder, directory)
        self.tokenizer.save_pretrained(directory)
        if self.document_encoder is not None:
            save_backbone(self.document_encoder, directory / DOCUMENT_TOWER)
        cfg = self.config
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        if cfg.normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
            (directory / "2_Normalize").mkdir(exist_ok=True)
        write_json(directory / "modules.json", modules)
        write_json(directory / "sentence_bert_config.json", {"max_seq_length": cfg.document_max_length, "do_lower_case": False})
        pooling = {"word_embedding_dimension": self.dimension}
        pooling.update({p.sentence_transformers_mode: p.name == cfg.pooling for p in POOLINGS.values()})
        write_json(directory / "1_Pooling" / "config.json", pooling)
        write_json(directory / "config_sentence_transformers.json", {
            "prompts": {"query": cfg.query_prefix, "document": cfg.document_prefix},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine" if cfg.normalize else "dot",
        })
        write_json(directory / CONFIG_NAME, asdict(cfg))

    @property
    def dimension(self) -> int:
        return int(self.query_encoder.config.hidden_size)

    def tower(self, is_query: bool) -> PreTrainedModel:
        return self.query_encoder if is_query or self.document_encoder is None else self.document_encoder

    def tokenize(self, texts: list[str], is_query: bool) -> dict[str, Tensor]:
        """Prefix, truncate and pad; token ids of each text are computed once and cached."""
        prefix = self.config.query_prefix if is_query else self.config.document_prefix
        max_length = self.config.query_max_length if is_query else self.config.document_max_length
        missing = [t for t in dict.fromkeys(texts) if (is_query, t) not in self._token_cache]
        if missing:
            encoded = self.tokenizer([prefix + t for t in missing], truncation=True, max_length=max_length)["input_ids"]
            if len(self._token_cache) + len(missing) > self.token_cache_size:
                self._token_cache.clear()
            self._token_cache.update({(is_query, t): ids for t, ids in zip(missing, encoded)})
        ids = [{"input_ids": self._token_cache[(is_query, t)]} for t in texts]
        return dict(self.tokenizer.pad(ids, return_tensors="pt"))

    def encode(self, inputs: dict[str, Tensor], is_query: bool) -> Tensor:
        """Embeddings ``[B, D]`` of tokenized inputs (L2-normalised if configured)."""
        output = self.tower(is_query)(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        embeddings = self.pooling(output.last_hidden_state, inputs["attention_mask"])
        return F.normalize(embeddings, dim=-1) if self.config.normalize else embeddings

    def forward(self, texts: list[str], is_query: bool) -> Tensor:
        device = next(self.parameters()).device
        inputs = {k: v.to(device) for k, v in self.tokenize(texts, is_query).items()}
        return self.encode(inputs, is_query)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str], is_query: bool, batch_size: int = 64) -> Tensor:
        """Embed many texts in length-sorted batches (little padding); rows in input order."""
        return in_length_order(lambda idx: self([texts[i] for i in idx], is_query), [len(t) for t in texts],
                               batch_size, self.dimension, label="encoding queries" if is_query else "encoding documents",
                               unit="texts")


def _read_config(path: Path, read_pooling: bool = True) -> dict:
    """Our own config if present, else what a sentence-transformers directory says (its pooling only with
    ``read_pooling``: an explicit ``pooling=`` makes an unsupported mode in the file irrelevant)."""
    if (path / CONFIG_NAME).is_file():
        known = {f.name for f in fields(BiEncoderConfig)}
        return {k: v for k, v in json.loads((path / CONFIG_NAME).read_text()).items() if k in known}
    config: dict = {}
    modules_file = path / "modules.json"
    if modules_file.is_file():
        modules = json.loads(modules_file.read_text())
        config["normalize"] = any(m.get("type", "").endswith("Normalize") for m in modules)
        for module in modules:
            pooling_file = path / module.get("path", "") / "config.json"
            if read_pooling and module.get("type", "").endswith("Pooling") and pooling_file.is_file():
                flags = json.loads(pooling_file.read_text())
                config["pooling"] = pooling_from_sentence_transformers(flags, str(pooling_file))
    st_config = path / "sentence_bert_config.json"
    if st_config.is_file() and (length := json.loads(st_config.read_text()).get("max_seq_length")):
        # sentence-transformers cuts queries and documents alike: so do we, unless told otherwise
        config["query_max_length"] = config["document_max_length"] = int(length)
    prompts_file = path / "config_sentence_transformers.json"
    if prompts_file.is_file():
        prompts = json.loads(prompts_file.read_text()).get("prompts") or {}
        config["query_prefix"] = prompts.get("query", "")
        config["document_prefix"] = prompts.get("document", prompts.get("passage", ""))
    return config
