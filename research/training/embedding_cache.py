"""A disk cache of corpus embeddings keyed on the model's weights and settings and on the corpus text.

Re-evaluating an unchanged model on an unchanged corpus (``evaluate_before_fit`` in every run of a sweep, repeated
``research evaluate`` calls) then skips corpus encoding. The key hashes every parameter, so a trained model never
hits the entry of its starting point. Files are safetensors, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from research.io import atomic_write


def cache_root() -> Path:
    return Path(os.environ.get("RESEARCH_CACHE_DIR") or Path.home() / ".cache" / "research").expanduser() / "embeddings"


def fingerprint(model: nn.Module, settings: dict, documents: Iterable[tuple[str, str]]) -> str:
    """Hex digest of the model's parameters and buffers, its settings (JSON) and the (id, text) pairs."""
    digest = hashlib.blake2b(digest_size=20)
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for doc_id, text in documents:
        digest.update(doc_id.encode() + b"\x00" + text.encode() + b"\x01")
    return digest.hexdigest()


class EmbeddingCache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else cache_root()

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.safetensors", self.root / f"{key}.ids.json"

    def load(self, key: str) -> tuple[list[str], torch.Tensor] | None:
        tensors, ids = self._paths(key)
        if not (tensors.is_file() and ids.is_file()):
            return None
        doc_ids = json.loads(ids.read_text())
        embeddings = load_file(tensors)["embeddings"]
        return (doc_ids, embeddings) if len(doc_ids) == embeddings.shape[0] else None

    def save(self, key: str, doc_ids: list[str], embeddings: torch.Tensor) -> None:
        tensors, ids = self._paths(key)
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_write(ids) as handle:  # ids first: an entry counts only once its tensor file exists too
            json.dump(doc_ids, handle)
        tmp = tensors.with_suffix(".tmp")
        save_file({"embeddings": embeddings.contiguous()}, str(tmp))
        os.replace(tmp, tensors)
