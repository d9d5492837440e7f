"""The one owner of seed derivation: seeds computed from values, the same in every process, platform and Python
version (unlike the salted ``hash``).

Three derivations live here because committed runs and vote files depend on their exact values: data order and
per-batch random streams of a fit, and zELO's per-query pair samples (pinned by the tests)."""

from __future__ import annotations

import hashlib
import zlib


def stable_seed(*parts: object) -> int:
    """A 32-bit seed for data order (samplers, per-item negative draws): CRC-32 of ``repr(parts)``."""
    return zlib.crc32(repr(parts).encode())


def stream_seed(*parts: object) -> int:
    """A 63-bit seed for a random stream (the per-batch dropout RNG of an exactly resumable fit): BLAKE2b."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "big") >> 1


def key_seed(seed: int, key: str) -> int:
    """A 64-bit seed for ``key`` (a query id, a document pair) under ``seed``: BLAKE2b of ``"<seed>\\x1f<key>"``."""
    digest = hashlib.blake2b(f"{int(seed)}\x1f{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")
