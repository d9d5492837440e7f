"""Which retrieved documents become hard negatives: the filters, their settings, and the count of what each removed.

Candidates are a query's ranked documents (best first). Each passes, in this order, the filters below, and the first
one that rejects it is the one it is counted against (``MiningStats``):

1. ``positive``         every labelled document of the query (any qrels grade > 0), however many it has;
2. ``rank_window``      keep retrieval ranks ``rank_min..rank_max`` (1-based, counted over the full ranking,
                        positives included: rank 1 is the retriever's top document);
3. ``margin``           keep ``score < min_positive_score - margin`` (absolute margin);
4. ``relative_margin``  keep ``score < min_positive_score * (1 - relative_margin)``;
5. ``max_score``        keep ``score <= max_score``;
6. ``rescorer``         keep ``teacher_score <= max_rescore_score`` (a cross-encoder's view of false negatives);
7. ``num_negatives``    keep the best-ranked ``num_negatives`` survivors.

``min_positive_score`` is the retriever's lowest score over the query's positives (the strictest choice when a
query has several). Used by dense mining (:mod:`research.retrieval.mining`) and by groups from any run
(:mod:`research.retrieval.run_groups`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from research.data.groups import qrels_positives
from research.data.trec import Qrels
from research.errors import ResearchError

FILTERS = ("positive", "rank_window", "margin", "relative_margin", "max_score", "rescorer", "num_negatives")


@dataclass(frozen=True)
class MiningConfig:
    """Which retrieved documents become negatives (see the module docstring for the order of the filters)."""

    depth: int = 100
    rank_min: int = 1
    rank_max: int | None = None
    margin: float | None = None
    relative_margin: float | None = None
    max_score: float | None = None
    num_negatives: int | None = None
    max_rescore_score: float | None = None

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ResearchError(f"depth must be >= 1, got {self.depth}")
        if self.rank_min < 1 or (self.rank_max is not None and self.rank_max < self.rank_min):
            raise ResearchError(f"rank window {self.rank_min}:{self.rank_max} is empty or starts below 1")
        if self.rank_max is not None and self.rank_max > self.depth:
            raise ResearchError(f"rank window ends at {self.rank_max}, beyond the retrieval depth {self.depth}")
        if self.rank_min > self.depth:
            raise ResearchError(f"rank window starts at {self.rank_min}, beyond the retrieval depth {self.depth}")
        if self.margin is not None and self.margin < 0:
            raise ResearchError(f"margin must be >= 0, got {self.margin}")
        if self.relative_margin is not None and not 0 <= self.relative_margin <= 1:
            raise ResearchError(f"relative margin must be in [0, 1], got {self.relative_margin}")
        if self.num_negatives is not None and self.num_negatives < 0:
            raise ResearchError(f"num_negatives must be >= 0, got {self.num_negatives}")

    @property
    def last_rank(self) -> int:
        return self.depth if self.rank_max is None else self.rank_max


def parse_rank_window(text: str | None) -> tuple[int, int | None]:
    """``"10:100"`` -> ``(10, 100)``; ``"10:"`` -> ``(10, None)``; ``":50"`` -> ``(1, 50)``; ``None`` -> ``(1, None)``."""
    if text is None:
        return 1, None
    start, sep, stop = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return (int(start) if start.strip() else 1), (int(stop) if stop.strip() else None)
    except ValueError:
        raise ResearchError(f"rank window '{text}': expected FIRST:LAST (1-based, inclusive), e.g. 10:100") from None


@dataclass
class MiningStats:
    """Candidates seen and, per filter, how many it removed (each candidate counted against the first filter)."""

    queries: int = 0
    candidates: int = 0
    removed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FILTERS, 0))
    kept: int = 0
    queries_without_negatives: int = 0

    def add(self, other: MiningStats) -> None:
        self.queries += other.queries
        self.candidates += other.candidates
        self.kept += other.kept
        self.queries_without_negatives += other.queries_without_negatives
        for name, count in other.removed.items():
            self.removed[name] = self.removed.get(name, 0) + count

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MiningStats:
        return cls(queries=data["queries"], candidates=data["candidates"], removed=dict(data["removed"]),
                   kept=data["kept"], queries_without_negatives=data["queries_without_negatives"])

    def table(self) -> str:
        lines = [f"queries {self.queries}  candidates {self.candidates}"]
        lines += [f"  removed by {name:<16} {count:>10}" for name, count in self.removed.items()]
        lines.append(f"  kept as negatives         {self.kept:>10}   (queries left without any: {self.queries_without_negatives})")
        return "\n".join(lines)


@dataclass
class Candidate:
    doc_id: str
    rank: int
    score: float
    teacher: float | None = None


def select_negatives(candidates: list[Candidate], excluded: set[str] | frozenset[str], positive_score: float | None,
                     config: MiningConfig, stats: MiningStats, rescore: Callable[[list[Candidate]], None] | None = None,
                     ) -> list[Candidate]:
    """Filters 1-7 over one query's ranked ``candidates`` (best first); counts removals into ``stats``.

    ``rescore`` (optional) fills ``Candidate.teacher`` of the survivors of filters 1-5 in place.
    """
    removed = stats.removed
    stats.candidates += len(candidates)
    kept = []
    for cand in candidates:
        if cand.doc_id in excluded:
            removed["positive"] += 1
        elif not config.rank_min <= cand.rank <= config.last_rank:
            removed["rank_window"] += 1
        elif config.margin is not None and positive_score is not None and not cand.score < positive_score - config.margin:
            removed["margin"] += 1
        elif (config.relative_margin is not None and positive_score is not None
              and not cand.score < positive_score * (1.0 - config.relative_margin)):
            removed["relative_margin"] += 1
        elif config.max_score is not None and not cand.score <= config.max_score:
            removed["max_score"] += 1
        else:
            kept.append(cand)
    if rescore is not None:
        if kept:
            rescore(kept)
        if config.max_rescore_score is not None:
            survivors = [c for c in kept if c.teacher <= config.max_rescore_score]
            removed["rescorer"] += len(kept) - len(survivors)
            kept = survivors
    if config.num_negatives is not None and len(kept) > config.num_negatives:
        removed["num_negatives"] += len(kept) - config.num_negatives
        kept = kept[:config.num_negatives]
    stats.kept += len(kept)
    stats.queries += 1
    stats.queries_without_negatives += not kept
    return kept


def positives_and_excluded(qrels: Qrels, relevance_level: int = 1) -> tuple[dict[str, list[str]], dict[str, frozenset[str]]]:
    """Per query: positives (grade >= ``relevance_level``) and every labelled document (grade > 0), never a negative.

    Queries without a positive are left out.
    """
    positives = qrels_positives(qrels, relevance_level)
    excluded = {qid: frozenset(d for d, grade in qrels[qid].items() if grade > 0) | frozenset(pos)
                for qid, pos in positives.items()}
    return positives, excluded
