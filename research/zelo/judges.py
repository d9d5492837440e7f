"""Pairwise judges for zELO: each says how likely document A is more relevant to a query than document B.

Every judge has ``name`` and ``judge_pairs(queries, docs_a, docs_b) -> list[float]`` (batched, one probability
per pair); :meth:`Judge.judge` is the single-pair form. Judges here:

- :class:`ScoreJudge`: any pointwise scorer of the framework (the :class:`research.retrieval.rerank.PairScorer` protocol:
  cross-encoder, bi-encoder through :class:`~research.retrieval.rerank.BiEncoderScorer`, LLM reranker), turned pairwise by
  ``p = sigmoid((s_a - s_b) / temperature)``;
- :func:`bm25_judge`: a :class:`ScoreJudge` over :class:`BM25Scorer` (bm25s, the settings of :mod:`research.retrieval.bm25`);
- :class:`research.zelo.llm_judge.ChatJudge`: an OpenAI-compatible chat model asked "A or B?";
- :class:`Ensemble`: the mean of several judges' probabilities, keeping each judge's vote.

Judges are built from specs (:func:`parse_judge_spec`, :func:`build_judge`): short strings such as
``bm25:temperature=1.0``, ``model:DIR:temperature=0.1``, ``llm:URL:MODEL:KEY_ENV``, or dicts (YAML / JSON lists).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.special import expit
from torch import Tensor

from research.errors import DataFormatError, ResearchError

if TYPE_CHECKING:
    from research.data.beir import RetrievalDataset
    from research.retrieval.rerank import PairScorer


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


def _check_lengths(queries: Sequence[str], docs_a: Sequence[str], docs_b: Sequence[str]) -> None:
    if not len(queries) == len(docs_a) == len(docs_b):
        raise ValueError(f"{len(queries)} queries, {len(docs_a)} documents A and {len(docs_b)} documents B")


class ScoreJudge(Judge):
    """A pointwise scorer as a pairwise judge: ``p = sigmoid((s_a - s_b) / temperature)``.

    Each distinct (query, document) text pair is scored once per call (a document meets ~2 x cycles others).
    ``temperature`` is in the scorer's units: e.g. ~1 for BM25, ~0.05 for cosine similarities, ~1 for logits.
    """

    def __init__(self, scorer: PairScorer, temperature: float = 1.0, name: str = "scorer", batch_size: int = 32) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.scorer, self.temperature, self.name, self.batch_size = scorer, float(temperature), name, batch_size

    def scores(self, queries: Sequence[str], documents: Sequence[str]) -> dict[tuple[str, str], float]:
        unique = list(dict.fromkeys(zip(queries, documents)))
        if not unique:
            return {}
        values = self.scorer.score_pairs([q for q, _ in unique], [d for _, d in unique], self.batch_size)
        values = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
        if values.shape != (len(unique),) or not torch.isfinite(values).all():
            raise JudgeError(f"judge {self.name}: scorer {type(self.scorer).__name__} returned {tuple(values.shape)} "
                             f"scores (non-finite or not one per pair)")
        return dict(zip(unique, values.tolist()))

    def judge_pairs(self, queries: Sequence[str], docs_a: Sequence[str], docs_b: Sequence[str]) -> list[float]:
        _check_lengths(queries, docs_a, docs_b)
        scores = self.scores([*queries, *queries], [*docs_a, *docs_b])
        diff = np.array([scores[(q, a)] - scores[(q, b)] for q, a, b in zip(queries, docs_a, docs_b)], dtype=float)
        return [float(p) for p in expit(diff / self.temperature)]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "scorer": type(self.scorer).__name__, "temperature": self.temperature}


class BM25Scorer:
    """BM25 (bm25s, the settings of :func:`research.retrieval.bm25.bm25_search`) of any query against documents of a corpus.

    A document is found by its text (``Document.full_text``); one ``get_scores`` over the corpus per distinct query.
    """

    def __init__(self, data: RetrievalDataset, config=None) -> None:
        import bm25s

        from research.retrieval.bm25 import BM25Config

        self.config = config or BM25Config()
        self.stemmer = None
        if self.config.stemmer_language:
            import Stemmer

            self.stemmer = Stemmer.Stemmer(self.config.stemmer_language)
        texts = [doc.full_text for doc in data.corpus.values()]
        self.index = {text: i for i, text in enumerate(texts)}
        tokens = bm25s.tokenize(texts, stopwords=self.config.stopwords, stemmer=self.stemmer, show_progress=False)
        self.retriever = bm25s.BM25(k1=self.config.k1, b=self.config.b, method=self.config.method)
        self.retriever.index(tokens, show_progress=False)
        self._query_scores: dict[str, np.ndarray] = {}

    def _scores_of(self, query: str) -> np.ndarray:
        if query not in self._query_scores:
            import bm25s

            tokens = bm25s.tokenize([query], stopwords=self.config.stopwords, stemmer=self.stemmer,
                                    return_ids=False, show_progress=False)[0]
            if len(self._query_scores) > 10_000:
                self._query_scores.clear()
            self._query_scores[query] = np.asarray(self.retriever.get_scores(tokens), dtype=float)
        return self._query_scores[query]

    def score_pairs(self, queries: list[str], documents: list[str], batch_size: int = 32) -> Tensor:
        out = []
        for query, document in zip(queries, documents, strict=True):
            if document not in self.index:
                raise JudgeError("BM25 judge: a document is not in the corpus the judge was built on")
            out.append(self._scores_of(query)[self.index[document]])
        return torch.tensor(out, dtype=torch.float32)


def bm25_judge(data: RetrievalDataset, temperature: float = 1.0, name: str = "bm25", **bm25) -> ScoreJudge:
    from research.retrieval.bm25 import BM25Config

    return ScoreJudge(BM25Scorer(data, BM25Config(**bm25)), temperature=temperature, name=name)


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
        _check_lengths(queries, docs_a, docs_b)
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


# ---------------------------------------------------------------- specs
_OPTION = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=[^:]*$")
JUDGE_TYPES = ("bm25", "model", "llm")


def _coerce(value: str) -> Any:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(value.lower(), value)


def parse_judge_spec(spec: str) -> dict[str, Any]:
    """A judge spec string as a dict: ``TYPE[:POSITIONAL...][:key=value...]``.

    - ``bm25[:temperature=1.0]``
    - ``model:DIR[:temperature=0.1][:batch_size=32][:device=cuda][:max_length=256]`` (any scorer directory)
    - ``llm:URL:MODEL:KEY_ENV[:timeout=30][:retries=5][:logprobs=true]...`` (``KEY_ENV`` is the NAME of the
      environment variable holding the API key; leave it empty, ``llm:URL:MODEL:``, for a server without a key)

    Options ``key=value`` trail the spec (a value cannot contain ``:``); every judge takes ``name=`` and ``weight=``.
    A model name containing ``:`` needs the dict form (YAML / JSON judges file).
    """
    parts = spec.split(":")
    options: dict[str, Any] = {}
    while len(parts) > 1 and _OPTION.match(parts[-1]):
        key, value = parts.pop().split("=", 1)
        options.setdefault(key, _coerce(value))
    kind, rest = parts[0].strip().lower(), ":".join(parts[1:])
    if kind == "bm25":
        if rest:
            raise ResearchError(f"judge spec {spec!r}: bm25 takes options only (bm25:temperature=1.0)")
        return {"type": "bm25", **options}
    if kind == "model":
        if not rest:
            raise ResearchError(f"judge spec {spec!r}: expected model:DIR[:temperature=T]")
        return {"type": "model", "path": rest, **options}
    if kind == "llm":
        pieces = rest.rsplit(":", 2)
        if len(pieces) != 3 or not pieces[0] or not pieces[1]:
            raise ResearchError(f"judge spec {spec!r}: expected llm:URL:MODEL:KEY_ENV (KEY_ENV may be empty)")
        url, model, key_env = pieces
        return {"type": "llm", "base_url": url, "model": model, "api_key_env": key_env or None, **options}
    raise ResearchError(f"judge spec {spec!r}: unknown type {kind!r} (choose from {', '.join(JUDGE_TYPES)})")


def read_judge_specs(path: str | Path) -> list[dict[str, Any]]:
    """A YAML or JSON list of judge specs (dicts, or spec strings); ``{"judges": [...]}`` works too."""
    from research.io import read_yaml_file

    path = Path(path)
    if path.suffix.lower() == ".json":
        try:
            loaded = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as err:
            raise DataFormatError(path, err.lineno, None, f"invalid JSON ({err.msg} at column {err.colno})") from None
    else:
        loaded = read_yaml_file(path, "judges file")  # missing, non-UTF-8, YAML syntax: one line with the line
    if isinstance(loaded, Mapping):
        loaded = loaded.get("judges")
    if not isinstance(loaded, list) or not loaded:
        raise ResearchError(f"{path}: expected a non-empty list of judge specs (or a mapping with 'judges:')")
    specs = []
    for i, item in enumerate(loaded):
        if isinstance(item, str):
            specs.append(parse_judge_spec(item))
        elif isinstance(item, Mapping) and item.get("type") in JUDGE_TYPES:
            specs.append(dict(item))
        else:
            raise ResearchError(f"{path}: judge {i}: expected a spec string or a mapping with type: {'|'.join(JUDGE_TYPES)}")
        if "api_key" in specs[-1]:
            raise ResearchError(f"{path}: judge {i}: put the API key in an environment variable and name it "
                                f"with api_key_env, never in a file")
    return specs


def build_judge(spec: Mapping[str, Any], data: RetrievalDataset | None = None, device: str = "cpu") -> tuple[Judge, float]:
    """The judge a spec dict describes, and its ensemble weight. ``data`` (the corpus) is needed for BM25."""
    spec = dict(spec)
    kind = spec.pop("type")
    weight = float(spec.pop("weight", 1.0))
    try:
        if kind == "bm25":
            if data is None:
                raise ResearchError("a bm25 judge needs the dataset's corpus")
            return bm25_judge(data, **spec), weight
        if kind == "model":
            from research.retrieval.rerank import ScorerOptions, load_scorer

            path = spec.pop("path")
            options = ScorerOptions(max_length=spec.pop("max_length", None),
                                    trust_remote_code=bool(spec.pop("trust_remote_code", False)),
                                    device=str(spec.pop("device", device)))
            scorer = load_scorer(path, options)
            name = spec.pop("name", None) or f"model:{Path(str(path)).name}"
            return ScoreJudge(scorer, name=name, **spec), weight
        if kind == "llm":
            from research.zelo.llm_judge import ChatJudge

            return ChatJudge(**spec), weight
    except TypeError as err:  # an unknown option
        raise ResearchError(f"judge {kind}: {err}") from None
    raise ResearchError(f"unknown judge type {kind!r} (choose from {', '.join(JUDGE_TYPES)})")


def build_ensemble(specs: Sequence[Mapping[str, Any]], data: RetrievalDataset | None = None,
                   device: str = "cpu") -> Ensemble:
    """An :class:`Ensemble` of the judges ``specs`` describe; repeated names get ``#2``, ``#3``... suffixes."""
    judges, weights, seen = [], [], {}
    for spec in specs:
        judge, weight = build_judge(spec, data, device)
        base = judge.name
        seen[base] = seen.get(base, 0) + 1
        if seen[base] > 1:
            judge.name = f"{base}#{seen[base]}"
        judges.append(judge)
        weights.append(weight)
    return Ensemble(judges, weights)
