"""A disk cache of a frozen LLM reranker's last-token hidden states at every scored layer, so that its layer heads
train (and evaluate) on cached states: one backbone pass per (query, document) pair, however many epochs follow.

Key. A cache folder is keyed, like the corpus-embedding cache, on a fingerprint of the backbone's weights and on the
settings that change a state: the scored layers, the weights' dtype, the autocast dtype and the device type. Inside
it, a pair's key hashes its token ids (``head + query + middle + document + suffix``, already cut to
``max_length``), so a change of prompt, template, tokenizer or length limits can never hit another pair's state.

Files. New states are written in shards (safetensors: ``states [n, layers, hidden]`` float32, the pair keys in the
metadata), each atomically (temporary file, then rename) once ``shard_size`` states are pending and on
:meth:`CachedStates.flush`. A killed run loses at most the unflushed states; the next run loads every shard and
computes only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from research.io import cache_root, write_json
from research.models.llm_reranker import LayerwiseLLMReranker
from research.training.embedding_cache import fingerprint

SETTINGS_FILE = "cache.json"


def state_cache_root(root: str | Path | None = None) -> Path:
    if root is not None:
        return Path(root).expanduser()
    return cache_root("llm_states")


def pair_key(ids: list[int]) -> str:
    return hashlib.blake2b(json.dumps(ids).encode(), digest_size=16).hexdigest()


def compute_precision(device: torch.device) -> str:
    """The autocast in force for ``device`` ("off" or its dtype): part of the key, since it changes the states."""
    kind = device.type if device.type in ("cuda", "cpu", "xpu", "mps") else "cpu"
    if torch.is_autocast_enabled(kind):
        return f"autocast-{str(torch.get_autocast_dtype(kind)).removeprefix('torch.')}"
    return "off"


class StateShards:
    """The shards of one cache folder: every saved state indexed by pair key, plus the ones not yet written."""

    def __init__(self, folder: Path, shard_size: int) -> None:
        self.folder, self.shard_size = folder, shard_size
        self.index: dict[str, tuple[int, int]] = {}
        self.blocks: list[Tensor] = []
        self.pending_keys: list[str] = []
        self.pending: list[Tensor] = []
        for shard in sorted(folder.glob("shard-*.safetensors")) if folder.is_dir() else []:
            with safe_open(str(shard), "pt") as handle:
                states, keys = handle.get_tensor("states"), json.loads(handle.metadata()["keys"])
            if len(keys) != states.shape[0]:
                raise ValueError(f"{shard}: {len(keys)} keys for {states.shape[0]} states; delete the shard")
            self._add(keys, states)

    def _add(self, keys: list[str], states: Tensor) -> None:
        block = len(self.blocks)
        self.blocks.append(states)
        self.index.update({key: (block, row) for row, key in enumerate(keys)})

    def __len__(self) -> int:
        return len(self.index)

    def get(self, key: str) -> Tensor | None:
        found = self.index.get(key)
        return None if found is None else self.blocks[found[0]][found[1]]

    def put(self, keys: list[str], states: Tensor) -> None:
        states = states.detach().float().cpu().contiguous()
        self._add(keys, states)
        self.pending_keys += keys
        self.pending.append(states)
        if len(self.pending_keys) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending_keys:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"shard-{time.time_ns():020d}-{os.getpid()}.safetensors"
        tmp = self.folder / f".{name}.tmp"
        save_file({"states": torch.cat(self.pending)}, str(tmp), metadata={"keys": json.dumps(self.pending_keys)})
        os.replace(tmp, self.folder / name)
        self.pending_keys, self.pending = [], []


class CachedStates:
    """Scores of a frozen :class:`LayerwiseLLMReranker` from cached last-token states of its scored layers.

    :meth:`scores` returns ``[N, len(layers)]`` with gradients into the heads (not the backbone): the states of pairs
    seen before come from disk or memory, the others from one no-grad backbone pass (``batch_size`` pairs, longest
    first) and join the cache. Refuses a backbone with a trainable parameter: its states would go stale.
    """

    def __init__(self, reranker: LayerwiseLLMReranker, root: str | Path | None = None, shard_size: int = 1024,
                 batch_size: int = 32) -> None:
        trainable = [name for name, p in reranker.model.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(f"cached states need a frozen backbone; trainable: {trainable[:3]}")
        self.reranker, self.root = reranker, state_cache_root(root)
        self.shard_size, self.batch_size = shard_size, batch_size
        self._fingerprint: str | None = None
        self._shards: dict[str, StateShards] = {}
        self.computed = 0  # states this object computed (the rest came from the cache)

    def settings(self, precision: str) -> dict:
        model = self.reranker.model
        # the weights' fingerprint, not the model's name: a saved copy of the same frozen backbone shares the entry
        return {"backbone": self._backbone_fingerprint(), "layers": self.reranker.layers, "precision": precision,
                "weights_dtype": str(next(model.parameters()).dtype), "device": self.reranker.device.type}

    def _backbone_fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.reranker.model, {}, [])
        return self._fingerprint

    def folder(self, precision: str) -> Path:
        settings = self.settings(precision)
        digest = hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=20).hexdigest()
        return self.root / digest

    def _shards_for(self, precision: str) -> StateShards:
        if precision not in self._shards:
            folder = self.folder(precision)
            shards = StateShards(folder, self.shard_size)
            if not (folder / SETTINGS_FILE).is_file():
                write_json(folder / SETTINGS_FILE, self.settings(precision))
            self._shards[precision] = shards
        return self._shards[precision]

    def states(self, queries: list[str], documents: list[str]) -> Tensor:
        """Float32 CPU states ``[N, len(layers), hidden]`` of the pairs (pre-norm last-token states, layer order)."""
        reranker = self.reranker
        if len(queries) != len(documents):
            raise ValueError(f"{len(queries)} queries but {len(documents)} documents")
        shards = self._shards_for(compute_precision(reranker.device))
        ids = [reranker.pair_ids(q, d) for q, d in zip(queries, documents)]
        keys = [pair_key(row) for row in ids]
        missing = list({key: i for i, key in enumerate(keys) if shards.get(key) is None}.values())
        missing.sort(key=lambda i: len(ids[i]), reverse=True)
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start:start + self.batch_size]
            shards.put([keys[i] for i in chunk], self._compute([ids[i] for i in chunk]))
            self.computed += len(chunk)
        return torch.stack([shards.get(key) for key in keys])

    @torch.no_grad()
    def _compute(self, rows: list[list[int]]) -> Tensor:
        reranker = self.reranker
        width = max(map(len, rows))
        input_ids = torch.full((len(rows), width), reranker.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
        states = reranker.last_token_states(input_ids.to(reranker.device), attention_mask.to(reranker.device),
                                            reranker.layers)
        return torch.stack([states[layer] for layer in reranker.layers], dim=1)

    def scores(self, queries: list[str], documents: list[str], layers: list[int] | None = None) -> Tensor:
        """Float32 scores ``[N, len(layers)]`` (default: every scored layer) from the cached states."""
        layers = list(layers or self.reranker.layers)
        states = self.states(queries, documents).to(self.reranker.device)
        position = {layer: i for i, layer in enumerate(self.reranker.layers)}
        unknown = [layer for layer in layers if layer not in position]
        if unknown:
            raise ValueError(f"layers {unknown} are not cached (scored layers: {self.reranker.layers})")
        return self.reranker.score_states({layer: states[:, position[layer]] for layer in layers}, layers)

    def flush(self) -> None:
        for shards in self._shards.values():
            shards.flush()

    def __len__(self) -> int:
        return sum(len(s) for s in self._shards.values())
