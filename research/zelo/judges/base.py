"""What every zELO judge is: the :class:`Judge` interface, its :class:`JudgeError`, and the :class:`Ensemble` of judges."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from research.errors import ResearchError


class JudgeError(ResearchError):
    """A judge could not give a vote (e.g. an LLM endpoint failing after all retries)."""


class Judge:
    """Base class: subclasses set ``name`` and implement :meth:`judge_pairs`."""

    name: str = "judge"

    def judge_pairs(self, queries: Sequence[str], docs_a: Sequence[str], docs_b: Sequence[str]) -> list[float]:
        """P(docs_a[i] is more relevant to queries[i] than docs_b[i]) for each i, each in [0, 1]."""
        raise NotImplementedError

    def judge(self, query: str, doc_a: str, doc_b: str) -> float:
        return self.judge_pairs([query], [doc_a], [doc_b])[0]

    def describe(self) -> dict[str, Any]:
        """A JSON-safe description for the votes file's metadata (never a secret)."""
        return {"name": self.name, "class": type(self).__name__}


def check_lengths(queries: Sequence[str], docs_a: Sequence[str], docs_b: Sequence[str]) -> None:
    if not len(queries) == len(docs_a) == len(docs_b):
        raise ValueError(f"{len(queries)} queries, {len(docs_a)} documents A and {len(docs_b)} documents B")


class Ensemble(Judge):
    """The mean of several judges' probabilities; :meth:`judge_votes` also returns each judge's vote by name."""

    def __init__(self, judges: Sequence[Judge], weights: Sequence[float] | None = None, name: str = "ensemble") -> None:
        if not judges:
            raise ValueError("an ensemble needs at least one judge")
        names = [j.name for j in judges]
        if len(set(names)) != len(names):
            raise ValueError(f"judge names must be distinct (set name=...), got {names}")
        weights = [1.0] * len(judges) if weights is None else [float(w) for w in weights]
        if len(weights) != len(judges) or any(not (w >= 0 and math.isfinite(w)) for w in weights) or sum(weights) <= 0:
            raise ValueError(f"need one finite weight >= 0 per judge, not all 0; got {weights}")
        self.judges, self.weights, self.name = list(judges), weights, name

    def judge_votes(self, queries: Sequence[str], docs_a: Sequence[str], docs_b: Sequence[str]
                    ) -> tuple[list[float], list[dict[str, float]]]:
        check_lengths(queries, docs_a, docs_b)
        per_judge = {}
        for judge in self.judges:
            values = judge.judge_pairs(queries, docs_a, docs_b)
            if len(values) != len(queries):
                raise JudgeError(f"judge {judge.name} gave {len(values)} votes for {len(queries)} pairs")
            per_judge[judge.name] = [min(1.0, max(0.0, float(v))) for v in values]
        total = sum(self.weights)
        p = [sum(w * per_judge[j.name][i] for j, w in zip(self.judges, self.weights)) / total for i in range(len(queries))]
        votes = [{j.name: per_judge[j.name][i] for j in self.judges} for i in range(len(queries))]
        return [min(1.0, max(0.0, v)) for v in p], votes

    def judge_pairs(self, queries: Sequence[str], docs_a: Sequence[str], docs_b: Sequence[str]) -> list[float]:
        return self.judge_votes(queries, docs_a, docs_b)[0]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "weights": self.weights, "judges": [j.describe() for j in self.judges]}
