"""The manifest of an index directory: what made its embeddings, and the key that says whether two runs agree.

``manifest.json`` records the model (its name and a fingerprint of its weights and tokenizer), pooling,
normalisation, document prefix and max length, compute precision, storage dtype, dimension, corpus size and digest,
shard size, batch size and device type. :meth:`IndexManifest.key` hashes every field that changes an embedding
(the batch size only under reduced precision, where padding changes the rounding); a resumed ``research index``
and the embedding cache accept an existing directory only when the keys are equal, and a mismatch is an error
naming the manifest and the differing fields.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from research.errors import DataFormatError, ResearchError
from research.io import write_json

MANIFEST = "manifest.json"
FORMAT = 1
DTYPES = ("float32", "float16")
# fields that do not change an embedding: where the weights were read from, and where the corpus lives
_INFORMATIONAL = {"model", "corpus_path", "format"}


@dataclass(frozen=True)
class IndexManifest:
    model: str
    model_fingerprint: str
    pooling: str
    normalize: bool
    document_prefix: str
    max_length: int
    precision: str
    dtype: str
    dim: int
    count: int
    corpus_digest: str
    shard_size: int
    batch_size: int
    device_type: str
    corpus_path: str = ""
    format: int = FORMAT

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ResearchError(f"embedding dtype {self.dtype!r}: choose from {', '.join(DTYPES)}")
        if self.shard_size < 1 or self.batch_size < 1:
            raise ResearchError(f"shard size and batch size must be >= 1, got {self.shard_size}, {self.batch_size}")

    @property
    def num_shards(self) -> int:
        return -(-self.count // self.shard_size)

    def shard_rows(self, shard: int) -> tuple[int, int]:
        """(first corpus row, rows) of ``shard``."""
        start = shard * self.shard_size
        return start, min(self.shard_size, self.count - start)

    def embedding_settings(self) -> dict:
        """Every field that changes an embedding (what :meth:`key` hashes)."""
        settings = {k: v for k, v in asdict(self).items() if k not in _INFORMATIONAL}
        if self.precision == "32-true":
            settings.pop("batch_size")  # fp32 rounding does not depend on the padding of a batch (to ~1e-7)
        return settings

    def key(self) -> str:
        return hashlib.blake2b(json.dumps(self.embedding_settings(), sort_keys=True).encode(), digest_size=16).hexdigest()

    def differences(self, other: IndexManifest) -> list[str]:
        """``field: <self's> there, <other's> here`` for each embedding setting that differs (self: on disk)."""
        mine, theirs = self.embedding_settings(), other.embedding_settings()
        return [f"{k}: {mine.get(k)!r} there, {theirs.get(k)!r} here" for k in sorted(set(mine) | set(theirs))
                if mine.get(k) != theirs.get(k)]

    def write(self, directory: str | Path) -> None:
        write_json(Path(directory) / MANIFEST, asdict(self))


def read_manifest(directory: str | Path) -> IndexManifest:
    """The manifest of an index directory; a missing, unreadable or foreign file is an error naming it."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise DataFormatError(path, None, None, "no index manifest here (build the index with research index)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataFormatError(path, None, None, f"not a readable manifest ({err})") from None
    known = {f.name for f in fields(IndexManifest)}
    missing = sorted(known - set(data) - {"corpus_path", "format"})
    if not isinstance(data, dict) or missing:
        raise DataFormatError(path, None, None, f"not an index manifest (missing {', '.join(missing) or 'fields'})")
    if data.get("format") != FORMAT:
        raise DataFormatError(path, None, "format", f"index format {data.get('format')!r}, this code reads {FORMAT}")
    try:
        return IndexManifest(**{k: v for k, v in data.items() if k in known})
    except (TypeError, ResearchError) as err:
        raise DataFormatError(path, None, None, f"not an index manifest ({err})") from None


def check_same(existing: IndexManifest, wanted: IndexManifest, directory: str | Path, what: str) -> None:
    """Refuse to mix embeddings: ``existing`` (on disk) must have ``wanted``'s key."""
    if existing.key() != wanted.key():
        diff = "; ".join(existing.differences(wanted))
        raise ResearchError(f"{Path(directory) / MANIFEST}: made with other settings than {what} ({diff}); "
                            f"use another directory or delete this one")


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The part of a parameter this process holds: a DTensor's local shard (FSDP2), DeepSpeed ZeRO-3's partition."""
    if hasattr(tensor, "ds_tensor"):
        tensor = tensor.ds_tensor
    if hasattr(tensor, "to_local"):
        tensor = tensor.to_local()
    return tensor.detach()


def weights_digest(encoder: nn.Module, tokenizer=None) -> str:
    """blake2b of every parameter and buffer this process holds (names, shapes, bytes) and of the tokenizer."""
    digest = hashlib.blake2b(digest_size=20)
    for name, tensor in [*encoder.named_parameters(), *encoder.named_buffers()]:
        local = local_tensor(tensor).to("cpu").contiguous()
        digest.update(f"{name}:{tuple(local.shape)}:{local.dtype}".encode())
        digest.update(local.reshape(-1).view(torch.uint8).numpy().tobytes())
    if tokenizer is not None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:  # its truncation/padding state is set by each call: not part of what it is
            spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        else:
            spec = sorted(tokenizer.get_vocab().items())
        digest.update(json.dumps(spec, sort_keys=True).encode())
    return digest.hexdigest()
