"""Shard-by-shard corpus encoding: which shards a rank encodes, their length-sorted batches, and the buffer that
writes a shard once all its rows are in.

A rank reads only the texts of the shard it is encoding (through :meth:`OffsetCorpus.rows` or a dict), so its
memory is one shard of texts and embeddings whatever the corpus size. The batches of a shard depend only on the
shard (its texts sorted by length, longest first, ties in corpus order), never on the rank count, so 1 and N ranks
write the same files. Every driver uses these pieces: ``research index`` (a Lightning prediction whose writer callback
is :class:`research.training.index_writer.ShardWriter`), the bi-encoder module's evaluation and ``research mine``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import IterableDataset

from research import progress
from research.errors import ResearchError
from research.retrieval.index.manifest import IndexManifest, check_same, read_manifest
from research.retrieval.index.shards import assign, missing_shards, write_shard


class DictRows:
    """:meth:`OffsetCorpus.rows` for an in-memory corpus dict (rows in insertion order)."""

    def __init__(self, corpus: Mapping) -> None:
        self.corpus, self.ids = corpus, list(corpus)

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, start: int, stop: int) -> list[tuple[str, object]]:
        return [(i, self.corpus[i]) for i in self.ids[start:stop]]


def corpus_rows(corpus: Mapping):
    """Something with ``len`` and ``rows(start, stop)``: the corpus itself when it reads by row, else a view."""
    return corpus if hasattr(corpus, "rows") else DictRows(corpus)


def corpus_digest(corpus: Mapping) -> str:
    """The file digest of an :class:`OffsetCorpus`; for a dict, blake2b over its (id, text) pairs."""
    if hasattr(corpus, "digest"):
        return corpus.digest
    digest = hashlib.blake2b(digest_size=20)
    for doc_id, doc in corpus.items():
        digest.update(doc_id.encode() + b"\x00" + _text(doc).encode() + b"\x01")
    return digest.hexdigest()


def _text(doc) -> str:
    return doc.full_text if hasattr(doc, "full_text") else str(doc)


def prepare_directory(directory: str | Path, manifest: IndexManifest, what: str = "this index") -> None:
    """Create the index directory with ``manifest``, or check that the one there has the same key (resume)."""
    directory = Path(directory)
    if (directory / "manifest.json").is_file():
        check_same(read_manifest(directory), manifest, directory, what)
        return
    if directory.exists() and not directory.is_dir():
        raise ResearchError(f"{directory}: not a folder")
    directory.mkdir(parents=True, exist_ok=True)
    manifest.write(directory)


@dataclass
class ShardBatch:
    """One encoding batch of shard ``shard``: ``positions`` are rows within the shard (``rows`` in all)."""

    shard: int
    rows: int
    positions: list[int]
    ids: list[str]
    texts: list[str]

    def __len__(self) -> int:
        return len(self.texts)


def shard_batches(rows, manifest: IndexManifest, shard: int, batch_size: int) -> Iterator[ShardBatch]:
    """The batches of one shard: its texts by length, longest first (ties in corpus order)."""
    start, count = manifest.shard_rows(shard)
    records = rows.rows(start, start + count)
    if len(records) != count:
        raise ResearchError(f"shard {shard}: the corpus has {len(records)} rows at {start}, the manifest expects {count}")
    texts = [_text(doc) for _, doc in records]
    order = sorted(range(count), key=lambda i: len(texts[i]), reverse=True)
    for at in range(0, count, batch_size):
        chosen = order[at:at + batch_size]
        yield ShardBatch(shard, count, chosen, [records[i][0] for i in chosen], [texts[i] for i in chosen])


class ShardBatches(IterableDataset):
    """The batches of this rank's missing shards (one DataLoader item each: use ``batch_size=None``).

    :meth:`prepare` fixes the plan; all ranks must call it before any of them writes a shard (a barrier after it),
    since the plan is the list of shards missing at that moment.
    """

    def __init__(self, corpus: Mapping, manifest: IndexManifest, directory: str | Path, batch_size: int) -> None:
        super().__init__()
        if len(corpus) != manifest.count:
            raise ResearchError(f"the corpus has {len(corpus)} documents, the manifest {manifest.count}")
        self.rows, self.manifest, self.directory, self.batch_size = corpus_rows(corpus), manifest, Path(directory), batch_size
        self.shards: list[int] | None = None
        self.missing: list[int] = []

    def prepare(self, rank: int, world: int) -> list[int]:
        self.missing = missing_shards(self.directory, self.manifest)
        self.shards = assign(self.missing, rank, world)
        return self.shards

    def num_batches(self) -> int:
        assert self.shards is not None, "prepare() first"
        return sum(-(-self.manifest.shard_rows(s)[1] // self.batch_size) for s in self.shards)

    def __iter__(self) -> Iterator[ShardBatch]:
        if self.shards is None:
            raise RuntimeError("ShardBatches.prepare(rank, world) was not called")
        for shard in self.shards:
            yield from shard_batches(self.rows, self.manifest, shard, self.batch_size)


class ShardBuffer:
    """Collects a shard's embeddings batch by batch and writes the shard when its last row arrives."""

    def __init__(self, directory: str | Path, manifest: IndexManifest) -> None:
        self.directory, self.manifest = Path(directory), manifest
        self._open: dict[int, tuple[list[str], np.ndarray, int]] = {}
        self.written: list[int] = []

    def add(self, batch: ShardBatch, embeddings: Tensor | np.ndarray) -> int | None:
        """Take one batch's embeddings ``[len(batch), dim]``; the shard number once it is written, else None."""
        if isinstance(embeddings, Tensor):
            embeddings = embeddings.detach().float().cpu().numpy()
        if embeddings.shape != (len(batch), self.manifest.dim):
            raise ValueError(f"batch of {len(batch)} texts gave embeddings {embeddings.shape}, dim {self.manifest.dim}")
        ids, array, filled = self._open.get(batch.shard) or ([""] * batch.rows,
                                                            np.empty((batch.rows, self.manifest.dim), np.float32), 0)
        array[batch.positions] = embeddings
        for position, doc_id in zip(batch.positions, batch.ids):
            ids[position] = doc_id
        filled += len(batch)
        if filled < batch.rows:
            self._open[batch.shard] = (ids, array, filled)
            return None
        self._open.pop(batch.shard, None)
        write_shard(self.directory, self.manifest, batch.shard, ids, array)
        self.written.append(batch.shard)
        return batch.shard


def document_embedder(encoder) -> Callable[[list[str]], Tensor]:
    """Document embeddings of a batch of texts with a :class:`BiEncoder`, tokenized without its token cache (whose
    memory would grow with the corpus): prefix, truncation and padding as the encoder's own ``tokenize``."""
    config = encoder.config

    def embed(texts: list[str]) -> Tensor:
        inputs = encoder.tokenizer([config.document_prefix + t for t in texts], truncation=True,
                                   max_length=config.document_max_length, padding=True, return_tensors="pt")
        device = next(encoder.parameters()).device
        return encoder.encode({k: inputs[k].to(device) for k in ("input_ids", "attention_mask")}, is_query=False)

    return embed


def encode_missing(dataset: ShardBatches, embed: Callable[[list[str]], Tensor | np.ndarray],
                   label: str = "encoding shards") -> list[int]:
    """Encode and write every shard of ``dataset``'s plan in this process (prepared already); the shards written."""
    buffer = ShardBuffer(dataset.directory, dataset.manifest)
    total = sum(dataset.manifest.shard_rows(s)[1] for s in dataset.shards or [])
    if not total:  # every shard of this process's plan is written already: no stage to report
        return []
    with torch.inference_mode(), progress.stage(label, total=total, unit="texts") as step:
        for batch in dataset:
            buffer.add(batch, embed(batch.texts))
            step.advance(len(batch))
    return buffer.written
