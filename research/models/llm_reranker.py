"""A layer-wise LLM reranker: a causal LM asked "is this document relevant to this query?", scored per layer.

Prompt. The tokenizer's chat template (when it has one; else a plain-text layout) renders a system message holding
the instruction and a user message ``Query: <query>\\nDocument: <document>\\n<question>``, then the assistant header.
The rendered text is split at the query and document slots into three constant pieces (head, middle, suffix) that
are tokenized once; a pair's input ids are ``head + query ids + middle + document ids + suffix``. Only the query (to
``query_max_length``) and the document (to what ``max_length`` leaves) are cut: the suffix, which holds the question
and the assistant header the answer is read after, is never truncated.

Scoring. The relevance score is read at the LAST token from the logits of the answer tokens: :class:`~research.models.llm_readout.YesLogit`
(the logit of "Yes") or :class:`~research.models.llm_readout.YesNoLogOdds` (``logit(Yes) - logit(No)`` = ``log p(Yes) - log p(No)``).

Layer-wise scores. Every layer in ``scored_layers`` (``start_layer`` .. the last, every ``layer_stride``-th, the last
always included; 1-based: layer ``l`` is the output of decoder block ``l``) gets a score from its last-token state,
through a readout: ``"heads"`` (:class:`~research.models.llm_readout.LayerHeads`: per layer a copy of the final norm and a linear map onto the
answer tokens, initialised from the LM head's rows, so that at initialisation every head equals the LM-head readout
of the normalised state and the last layer's head reproduces the LM score exactly) or ``"lm_head"`` (no new
parameters: the LM head's answer rows over the final-norm-normalised intermediate state; any layer can exit).

Early exit. :meth:`LayerwiseLLMReranker.score_pairs` with ``exit_layer=k`` runs decoder blocks 1..k only (the
decoder's ``layers`` list is cut to k for the call, so the model's own code builds the rotary embeddings and the
causal / sliding-window masks) and returns the same score as the full forward's layer-k readout. Adaptive exit
(:meth:`LayerwiseLLMReranker.score_adaptive`, or the config's ``adaptive_threshold``) stops each pair at the first
scored layer whose calibrated score is confident enough (:mod:`research.models.llm_exit`).

Readouts run in float32 with autocast off, whatever the backbone's precision. LoRA via peft (:class:`~research.models.llm_config.LoraSettings`);
``save_pretrained`` writes the config, tokenizer and heads, plus the backbone (full weights) or the LoRA adapter
(``adapter/``, the base model referenced by name or path).

This file is the model (prompt tokenization, layer-wise forward, early exit, persistence); its settings are in
:mod:`research.models.llm_config`, the scoring rules and heads in :mod:`research.models.llm_readout`.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from research.io import write_json
from research.models.batching import evaluating, in_length_order
from research.models.llm_config import (
    ADAPTER_DIR,
    CONFIG_NAME,
    HEADS_FILE,
    LLMRerankerConfig,
    LoraSettings,
    read_config,
    scored_layers,
)
from research.models.llm_exit import adaptive_batch, decoder_slice
from research.models.llm_readout import SCORINGS, LayerHeads, autocast_off
from research.models.pretrained import resolve_model

QUERY_SLOT, DOCUMENT_SLOT = "\u27e6QUERY\u27e7", "\u27e6DOCUMENT\u27e7"


class LayerwiseLLMReranker(nn.Module):
    """Causal-LM relevance scores per layer, with early exit. Implements ``research.models.scorers.PairScorer``."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: LLMRerankerConfig,
                 heads: LayerHeads | None = None) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.scoring = SCORINGS[config.scoring]()
        self.num_layers = int(self._causal_lm().config.num_hidden_layers)
        self.layers = scored_layers(self.num_layers, config.start_layer, config.layer_stride)
        self.answer_ids = [self._single_token_id(t) for t in self.scoring.tokens(config.yes_token, config.no_token)]
        self._pieces = self._prompt_pieces()
        fixed = sum(len(p) for p in self._pieces)
        if config.max_length - fixed - config.query_max_length < 1:
            raise ValueError(f"max_length {config.max_length} leaves no document token: the prompt takes {fixed} tokens "
                             f"and queries up to {config.query_max_length}")
        if config.readout == "heads":
            weight, bias = self._answer_rows()
            self.heads = heads if heads is not None else LayerHeads(self.layers, self._final_norm(), weight, bias)
        else:
            self.heads = None
        if config.exit_layer is not None:
            self._check_exit_layer(config.exit_layer)
        self.pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
        self._cache: dict[tuple[bool, str], list[int]] = {}
        self.exit_counts: Counter[int] = Counter()  # pairs scored per exit layer by score_pairs / score_adaptive
        self.token_cache_size = 500_000

    # ------------------------------------------------------------------ backbone parts
    def _causal_lm(self) -> PreTrainedModel:
        """The ``*ForCausalLM`` module (under a peft wrapper, the base model with its LoRA layers injected)."""
        model = self.model
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        return model

    @property
    def decoder(self) -> nn.Module:
        """The decoder stack (``model.model`` for Llama / Qwen2): embeddings, ``layers``, final ``norm``."""
        return self._causal_lm().get_decoder()

    def _final_norm(self) -> nn.Module:
        return self.decoder.norm

    def _answer_rows(self) -> tuple[Tensor, Tensor | None]:
        """The LM head's rows (and bias entries) of the answer tokens, ``[n_tokens, hidden]``."""
        head = self._causal_lm().get_output_embeddings()
        index = torch.tensor(self.answer_ids, device=head.weight.device)
        bias = getattr(head, "bias", None)
        return head.weight.index_select(0, index), None if bias is None else bias.index_select(0, index)

    def _single_token_id(self, token: str) -> int:
        ids = self.tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"answer token {token!r} is {len(ids)} tokens for this tokenizer; pick a single-token word")
        return ids[0]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ prompt
    def render_prompt(self, query: str, document: str) -> str:
        """The full prompt text of one pair (chat template if the tokenizer has one and ``use_chat_template``)."""
        cfg = self.config
        user = f"Query: {query}\nDocument: {document}\n{cfg.question}"
        if cfg.use_chat_template and getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "system", "content": cfg.instruction}, {"role": "user", "content": user}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        bos = self.tokenizer.bos_token or ""
        return f"{bos}{cfg.instruction}\n{user}\nAnswer:\n"

    def _prompt_pieces(self) -> tuple[list[int], list[int], list[int]]:
        """Token ids of the constant head, middle and suffix around the query and document slots."""
        text = self.render_prompt(QUERY_SLOT, DOCUMENT_SLOT)
        if text.count(QUERY_SLOT) != 1 or text.count(DOCUMENT_SLOT) != 1 or text.index(QUERY_SLOT) > text.index(DOCUMENT_SLOT):
            raise ValueError("the chat template must render the user message verbatim (query before document, once each)")
        head, rest = text.split(QUERY_SLOT)
        middle, suffix = rest.split(DOCUMENT_SLOT)
        # a space before a slot is tokenized with the slot's text, as joint tokenization of byte-level BPE does
        self._query_space = " " if head.endswith(" ") else ""
        self._document_space = " " if middle.endswith(" ") else ""
        head, middle = head[: len(head) - len(self._query_space)], middle[: len(middle) - len(self._document_space)]
        return tuple(self.tokenizer.encode(p, add_special_tokens=False) for p in (head, middle, suffix))

    @property
    def suffix_ids(self) -> list[int]:
        return list(self._pieces[2])

    def _token_ids(self, texts: list[str], is_query: bool) -> list[list[int]]:
        """Token ids of the query / document slots (cut to the longest they can be), computed once per text."""
        missing = [t for t in dict.fromkeys(texts) if (is_query, t) not in self._cache]
        if missing:
            space = self._query_space if is_query else self._document_space
            limit = self.config.query_max_length if is_query else self.config.max_length
            encoded = self.tokenizer([space + t for t in missing], add_special_tokens=False, truncation=True,
                                     max_length=limit)["input_ids"]
            if len(self._cache) + len(missing) > self.token_cache_size:
                self._cache.clear()
            self._cache.update({(is_query, t): ids for t, ids in zip(missing, encoded)})
        return [self._cache[(is_query, t)] for t in texts]

    def pair_ids(self, query: str, document: str) -> list[int]:
        """``head + query + middle + document + suffix`` ids; only the document is cut to fit ``max_length``."""
        return self._pair_ids(self._token_ids([query], True)[0], self._token_ids([document], False)[0])

    def _pair_ids(self, query_ids: list[int], document_ids: list[int]) -> list[int]:
        head, middle, suffix = self._pieces
        budget = self.config.max_length - len(head) - len(query_ids) - len(middle) - len(suffix)
        return head + query_ids + middle + document_ids[:budget] + suffix

    def tokenize(self, queries: list[str], documents: list[str]) -> dict[str, Tensor]:
        """Right-padded ``input_ids`` / ``attention_mask`` (the answer is read at each row's last real token)."""
        if len(queries) != len(documents):
            raise ValueError(f"{len(queries)} queries but {len(documents)} documents")
        rows = [self._pair_ids(q, d) for q, d in zip(self._token_ids(queries, True), self._token_ids(documents, False))]
        width = max(map(len, rows))
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    # ------------------------------------------------------------------ scoring
    def _check_exit_layer(self, layer: int) -> None:
        if not 1 <= layer <= self.num_layers:
            raise ValueError(f"exit layer must be in 1..{self.num_layers}, got {layer}")
        if self.heads is not None and layer not in self.layers:
            raise ValueError(f"exit layer {layer} has no head (scored layers: {self.layers}); use readout='lm_head' "
                             "for any layer, or a start_layer / layer_stride that includes it")

    def readout(self, layer: int, state: Tensor) -> Tensor:
        """Answer-token logits ``[B, n_tokens]`` of the last-token state ``[B, H]`` at ``layer`` (float32, no autocast)."""
        with autocast_off(state.device):
            state = state.float()
            if self.heads is not None:
                return self.heads(layer, state)
            weight, bias = self._answer_rows()
            normed = self._final_norm()(state).float()
            return torch.nn.functional.linear(normed, weight.float(), None if bias is None else bias.float())

    def score_states(self, states: dict[int, Tensor], layers: list[int]) -> Tensor:
        """Scores ``[B, len(layers)]`` from last-token states keyed by layer."""
        return torch.stack([self.scoring(self.readout(layer, states[layer])) for layer in layers], dim=1)

    def _truncated(self, depth: int) -> contextlib.AbstractContextManager:
        """The decoder runs its first ``depth`` blocks only, for the duration of the block."""
        return decoder_slice(self, 0, depth)

    def last_token_states(self, input_ids: Tensor, attention_mask: Tensor, layers: list[int]) -> dict[int, Tensor]:
        """Each requested layer's hidden state at each row's last real token ``[B, H]`` (pre-norm), running the decoder
        blocks up to the deepest requested layer only. Forward hooks on the blocks read the states."""
        if not layers or not all(1 <= layer <= self.num_layers for layer in layers):
            raise ValueError(f"layers must be in 1..{self.num_layers}, got {layers}")
        decoder = self.decoder
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        last = attention_mask.sum(1) - 1
        states: dict[int, Tensor] = {}

        def capture(layer: int):
            def hook(module, args, output):
                hidden = output[0] if isinstance(output, tuple) else output
                states[layer] = hidden[rows, last]
            return hook

        handles = [decoder.layers[layer - 1].register_forward_hook(capture(layer)) for layer in set(layers)]
        try:
            with self._truncated(max(layers)):
                decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        return states

    def forward(self, input_ids: Tensor, attention_mask: Tensor, layers: list[int] | None = None) -> Tensor:
        """Float32 scores ``[B, len(layers)]`` (default: every scored layer), with gradients."""
        layers = list(layers or self.layers)
        if self.heads is not None:
            for layer in layers:
                self._check_exit_layer(layer)
        states = self.last_token_states(input_ids.to(self.device), attention_mask.to(self.device), layers)
        return self.score_states(states, layers)

    def score_texts(self, queries: list[str], documents: list[str], layers: list[int] | None = None) -> Tensor:
        """:meth:`forward` on text pairs: ``[N, len(layers)]`` with gradients."""
        return self(**self.tokenize(queries, documents), layers=layers)

    @torch.inference_mode()
    def score_layers(self, queries: list[str], documents: list[str], layers: list[int] | None = None,
                     batch_size: int = 32) -> Tensor:
        """Float32 CPU scores ``[N, len(layers)]`` in input order, in length-sorted batches, one pass per batch."""
        if len(queries) != len(documents):
            raise ValueError(f"{len(queries)} queries but {len(documents)} documents")
        layers = list(layers or self.layers)
        with evaluating(self):
            return in_length_order(lambda idx: self.score_texts([queries[i] for i in idx], [documents[i] for i in idx], layers),
                                   [len(q) + len(d) for q, d in zip(queries, documents)], batch_size, len(layers))

    def score_pairs(self, queries: list[str], documents: list[str], batch_size: int = 32,
                    exit_layer: int | None = None, adaptive_threshold: float | None = None) -> Tensor:
        """``research.models.scorers.PairScorer``: scores ``[N]`` at ``exit_layer`` (default: the config's, else the last),
        running only the decoder blocks up to it; with an ``adaptive_threshold`` (default: the config's) each pair exits
        early at the first confident scored layer (:meth:`score_adaptive`)."""
        layer = exit_layer or self.config.exit_layer or self.num_layers
        self._check_exit_layer(layer)
        threshold = self.config.adaptive_threshold if adaptive_threshold is None else adaptive_threshold
        if threshold is not None:
            return self.score_adaptive(queries, documents, threshold, layer, batch_size)[0]
        self.exit_counts[layer] += len(queries)
        return self.score_layers(queries, documents, [layer], batch_size)[:, 0]

    @torch.inference_mode()
    def score_adaptive(self, queries: list[str], documents: list[str], threshold: float, exit_layer: int | None = None,
                       batch_size: int = 32) -> tuple[Tensor, Tensor]:
        """Calibrated scores ``[N]`` and exit layers ``[N]``, each pair stopping at the first scored layer whose
        calibrated score has ``|score| >= threshold`` (:mod:`research.models.llm_exit`); counted in :attr:`exit_counts`."""
        layer = exit_layer or self.config.exit_layer or self.num_layers
        self._check_exit_layer(layer)
        if len(queries) != len(documents):
            raise ValueError(f"{len(queries)} queries but {len(documents)} documents")
        exits = torch.empty(len(queries), dtype=torch.long)

        def batch(idx: list[int]) -> Tensor:
            scores, exits[idx] = adaptive_batch(self, **self.tokenize([queries[i] for i in idx], [documents[i] for i in idx]),
                                                threshold=threshold, exit_layer=layer)
            return scores

        with evaluating(self):
            scores = in_length_order(batch, [len(q) + len(d) for q, d in zip(queries, documents)], batch_size)
        self.exit_counts.update(exits.tolist())
        return scores, exits

    def set_exit(self, exit_layer: int | None = None, adaptive_threshold: float | None = None) -> None:
        """The exit rule :meth:`score_pairs` uses by default (``research rerank --exit-layer / --adaptive-exit``)."""
        if exit_layer is not None:
            self._check_exit_layer(exit_layer)
            self.config.exit_layer = exit_layer
        if adaptive_threshold is not None:
            if not adaptive_threshold >= 0:
                raise ValueError(f"adaptive exit threshold must be >= 0, got {adaptive_threshold}")
            self.config.adaptive_threshold = adaptive_threshold

    # ------------------------------------------------------------------ LoRA, checkpointing
    @property
    def has_lora(self) -> bool:
        return hasattr(self.model, "peft_config")

    def enable_lora(self, settings: LoraSettings) -> None:
        """Wrap the backbone with LoRA adapters (its own weights frozen); the layer heads stay trainable."""
        from peft import get_peft_model

        if self.has_lora:
            raise ValueError("the backbone already has LoRA adapters")
        self.model = get_peft_model(self.model, settings.peft_config())
        self.config.lora = asdict(settings)

    def merge_lora(self) -> None:
        """Fold the adapters into the backbone weights (scores unchanged); afterwards a plain model."""
        if self.has_lora:
            self.model = self.model.merge_and_unload()
            self.config.lora = None

    def gradient_checkpointing_enable(self) -> None:
        model = self._causal_lm()
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False

    # ------------------------------------------------------------------ persistence
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, lora: LoraSettings | dict | None = None,
                        dtype: str | torch.dtype | None = None, trainable_adapter: bool = False,
                        trust_remote_code: bool = False, **overrides) -> LayerwiseLLMReranker:
        """A saved reranker directory, or any causal-LM directory / packaged name / hub id (fresh heads).

        ``lora``: add new LoRA adapters (a saved reranker with adapters reloads those instead; ``trainable_adapter`` keeps
        them trainable). ``dtype``: backbone weights' type (default float32). ``overrides``: config fields.
        """
        path = resolve_model(name_or_path)
        saved = read_config(path)
        overrides = {k: v for k, v in overrides.items() if v is not None}
        config = LLMRerankerConfig(**{**saved, **overrides})
        dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else (dtype or torch.float32)
        adapter = path / ADAPTER_DIR
        if saved and adapter.is_dir():
            if not saved.get("base_model"):
                raise ValueError(f"{path}: an adapter directory needs the base_model in {CONFIG_NAME}")
            base_path = resolve_model(saved["base_model"])
            backbone = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, trust_remote_code=trust_remote_code)
            from peft import PeftModel

            backbone = PeftModel.from_pretrained(backbone, adapter, is_trainable=trainable_adapter)
        else:
            backbone = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
            config.lora = None
            # where these backbone weights come from: what a LoRA adapter saved later refers to
            config.base_model = str(path.resolve()) if Path(name_or_path).expanduser().is_dir() else str(name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = cls(backbone, tokenizer, config)
        heads_file = path / HEADS_FILE
        if model.heads is not None and saved.get("readout") == "heads" and not heads_file.is_file():
            # a saved reranker's heads are trained weights: fresh ones would score silently differently
            raise ValueError(f"{heads_file}: missing; the saved config reads out with layer heads")
        if model.heads is not None and heads_file.is_file():
            from safetensors.torch import load_file

            state = load_file(str(heads_file))
            missing, unexpected = model.heads.load_state_dict(state, strict=False)
            if unexpected:
                raise ValueError(f"{heads_file}: heads of layers the config does not score ({unexpected[:3]})")
            if missing:
                layers = sorted({int(key.split(".")[1]) for key in missing})
                raise ValueError(f"{heads_file}: no head for layer {', '.join(map(str, layers))} (missing "
                                 f"{', '.join(missing[:4])}); score only the saved layers, or start from the base model")
        if lora is not None and not model.has_lora:  # a saved adapter is continued rather than stacked
            model.enable_lora(lora if isinstance(lora, LoraSettings) else LoraSettings(**lora))
        return model

    def save_pretrained(self, directory: str | Path) -> None:
        """Config (marker file), tokenizer, layer heads, and the backbone: full weights, or with LoRA the adapter only
        (``adapter/``; the base is the config's ``base_model``). Call :meth:`merge_lora` first to save full weights."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.has_lora:
            self.model.save_pretrained(directory / ADAPTER_DIR)
        else:
            self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        if self.heads is not None:
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous().cpu() for k, v in self.heads.state_dict().items()}, str(directory / HEADS_FILE))
        write_json(directory / CONFIG_NAME, asdict(self.config))
