"""The corpus-embedding cache: an index directory per key of everything that changes an embedding, and the
evaluation-time encoder that fills it with each rank's share of the shards.

The key is :meth:`research.retrieval.index.manifest.IndexManifest.key`: the weights (every parameter and buffer, each
rank's local shard of them under FSDP / ZeRO-3, combined over ranks) and the tokenizer, pooling, normalisation, prefix
and max length, precision, storage dtype, dimension, the corpus (digest and size), shard size, device type and, under
reduced precision, the batch size. Re-evaluating an unchanged model on an unchanged corpus (``evaluate_before_fit``
in every run of a sweep, repeated ``research evaluate`` calls) finds the complete directory and encodes nothing; a
trained model never hits the entry of its starting point. The directory is an ordinary index directory
(:class:`research.retrieval.index.search.ShardedIndex` reads it). Under several processes every rank must see the cache folder (``$RESEARCH_CACHE_DIR`` on a
shared filesystem across nodes): each writes its shards there and all ranks search them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from research.errors import ResearchError
from research.io import cache_root as research_cache_root
from research.retrieval.index.encode import ShardBatches, corpus_digest, encode_missing, prepare_directory
from research.retrieval.index.manifest import IndexManifest, weights_digest
from research.retrieval.index.shards import missing_shards
from research.training.distributed import is_distributed, rank, world_size


def cache_root() -> Path:
    return research_cache_root("embeddings")


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


def cache_dir(manifest: IndexManifest, cached: bool = True) -> Path:
    """The index directory of ``manifest``'s key; ``cached=False``: a scratch one, emptied before and after use."""
    return cache_root() / (manifest.key() if cached else f"uncached-{manifest.key()}")


def evaluation_shard_size(count: int) -> int:
    """Rows per shard for evaluation: 8 shards for small corpora (so up to 8 ranks share the work), at most 8192
    rows (memory). A function of the corpus size only: 1 and N ranks write the same shards."""
    return max(1, min(8192, -(-count // 8)))


def _gather(value):
    if not is_distributed():
        return [value]
    out: list = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def _barrier() -> None:
    if is_distributed():
        dist.barrier()


def model_fingerprint(encoder: nn.Module, tokenizer) -> str:
    """:func:`weights_digest` of what this rank holds, combined over ranks (equal on every rank)."""
    digests = _gather(weights_digest(encoder, tokenizer))
    if len(set(digests)) == 1:
        return digests[0]
    return hashlib.blake2b("".join(digests).encode(), digest_size=20).hexdigest()


def encode_corpus(encoder, corpus: Mapping, embed: Callable[[list[str]], Tensor], *, model_name: str, precision: str,
                  batch_size: int, device_type: str, cached: bool = True, shard_size: int | None = None,
                  dtype: str = "float32") -> Path:
    """Make the complete index directory of ``corpus`` under ``encoder``, every rank encoding its share of the
    missing shards with ``embed`` (a collective: every rank calls it; ranks call ``embed`` equally often, padding
    with one-text batches, because a forward under FSDP or ZeRO-3 is itself a collective)."""
    config = encoder.config
    manifest = IndexManifest(
        model=model_name, model_fingerprint=model_fingerprint(encoder, encoder.tokenizer), pooling=config.pooling,
        normalize=config.normalize, document_prefix=config.document_prefix, max_length=config.document_max_length,
        precision=precision, dtype=dtype, dim=encoder.dimension, count=len(corpus), corpus_digest=corpus_digest(corpus),
        shard_size=shard_size or evaluation_shard_size(len(corpus)), batch_size=batch_size, device_type=device_type)
    directory = cache_dir(manifest, cached)
    if rank() == 0:
        if not cached:
            shutil.rmtree(directory, ignore_errors=True)
        prepare_directory(directory, manifest, "this evaluation")
    _barrier()
    dataset = ShardBatches(corpus, manifest, directory, batch_size)
    dataset.prepare(rank(), world_size())
    _barrier()  # every rank has its plan before any shard is written
    most = max(_gather(dataset.num_batches()))
    encode_missing(dataset, embed, f"encoding corpus shards (rank {rank()})" if is_distributed() else "encoding corpus")
    with torch.inference_mode():
        for _ in range(most - dataset.num_batches()):
            embed(["."])
    _barrier()
    left = missing_shards(directory, manifest)
    if left:
        raise ResearchError(f"{directory}: {len(left)} shards missing after encoding on rank {rank()}: every rank "
                            f"must see the same cache folder (set RESEARCH_CACHE_DIR to a shared filesystem)")
    return directory


def release(directory: Path, cached: bool) -> None:
    """After every rank has searched: remove a scratch (uncached) directory."""
    _barrier()
    if not cached and rank() == 0:
        shutil.rmtree(directory, ignore_errors=True)
