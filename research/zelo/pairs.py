"""Which document pairs to judge: the union of random Hamiltonian cycles (zELO, arXiv 2509.12541, sec. 3)."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import numpy as np


def sample_pairs(
    doc_ids: Sequence[str], cycles: int = 4, seed: int = 0, all_pairs: bool = False,
) -> list[tuple[str, str]]:
    """Pairs to judge: the union of ``cycles`` random Hamiltonian cycles, deduplicated as unordered pairs.

    Each cycle is a random permutation closed into a ring, so every document meets 2 others per cycle
    (about ``2 * cycles`` in all, and the comparison graph is connected); 100 documents at 4 cycles give
    about 390 pairs instead of 4950. A pair keeps the orientation in which its first cycle walked it,
    which randomises which document a judge sees first. ``all_pairs`` gives all N(N-1)/2 pairs in input order.
    """
    docs = list(doc_ids)
    if len(set(docs)) != len(docs):
        raise ValueError("sample_pairs: doc_ids contain duplicates")
    if all_pairs:
        return list(combinations(docs, 2))
    if cycles < 1:
        raise ValueError(f"sample_pairs: cycles must be >= 1, got {cycles}")
    n = len(docs)
    if n < 2:
        return []
    rng = np.random.default_rng(seed)
    seen: set[frozenset[int]] = set()
    pairs: list[tuple[str, str]] = []
    for _ in range(cycles):
        order = rng.permutation(n)
        for a, b in zip(order, np.roll(order, -1)):
            key = frozenset((int(a), int(b)))
            if key not in seen:
                seen.add(key)
                pairs.append((docs[a], docs[b]))
    return pairs
