"""The LLM reranker's settings: prompt, scoring rule, layer-wise readout and LoRA, as saved in its marker file."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from research.models.llm_readout import READOUTS, SCORINGS

CONFIG_NAME = "research_llm_reranker.json"
HEADS_FILE = "layer_heads.safetensors"
ADAPTER_DIR = "adapter"
DEFAULT_INSTRUCTION = "Judge whether the Document is relevant to the Query. Answer only \"Yes\" or \"No\"."
DEFAULT_QUESTION = "Is the Document relevant to the Query? Answer Yes or No."
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraSettings:
    """LoRA adapters (peft) on the backbone's linear layers named in ``target_modules``."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules), bias="none")


@dataclass
class LLMRerankerConfig:
    """Prompt, scoring and layer-wise settings; written as ``research_llm_reranker.json`` (the marker file).

    ``start_layer``: first scored layer (1-based; ``None``: only the last layer). ``exit_layer``: the layer whose score
    ``score_pairs`` returns by default (``None``: the last). ``max_length``: tokens of the whole prompt.
    ``adaptive_threshold``: ``score_pairs`` exits each pair at the first scored layer whose calibrated score has
    ``|score| >= adaptive_threshold`` (``None``: a fixed exit; :mod:`research.models.llm_exit`). ``calibration``:
    ``{layer: [scale, bias]}`` turning each scored layer's score into a log-odds of relevance (``None``: identity).
    """

    instruction: str = DEFAULT_INSTRUCTION
    question: str = DEFAULT_QUESTION
    use_chat_template: bool = True
    scoring: str = "yes_no"
    yes_token: str = "Yes"
    no_token: str = "No"
    max_length: int = 256
    query_max_length: int = 64
    readout: str = "heads"
    start_layer: int | None = None
    layer_stride: int = 1
    exit_layer: int | None = None
    base_model: str | None = None
    lora: dict | None = None
    adaptive_threshold: float | None = None
    calibration: dict[str, list[float]] | None = None

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {sorted(SCORINGS)}, got {self.scoring!r}")
        if self.readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {self.readout!r}")
        if self.layer_stride < 1 or self.query_max_length < 1:
            raise ValueError("layer_stride and query_max_length must be >= 1")
        if self.adaptive_threshold is not None and not self.adaptive_threshold >= 0:
            raise ValueError(f"adaptive_threshold must be >= 0, got {self.adaptive_threshold}")


def scored_layers(num_layers: int, start_layer: int | None, stride: int = 1) -> list[int]:
    """``start_layer, start_layer + stride, ...`` up to ``num_layers``, always ending with ``num_layers`` (1-based)."""
    if start_layer is None:
        return [num_layers]
    if not 1 <= start_layer <= num_layers:
        raise ValueError(f"start_layer must be in 1..{num_layers}, got {start_layer}")
    return sorted(set(range(start_layer, num_layers + 1, stride)) | {num_layers})


def read_config(path: Path) -> dict:
    """The saved config's known fields; an empty dict when ``path`` holds no reranker config."""
    if not (path / CONFIG_NAME).is_file():
        return {}
    known = {f.name for f in fields(LLMRerankerConfig)}
    return {k: v for k, v in json.loads((path / CONFIG_NAME).read_text()).items() if k in known}
