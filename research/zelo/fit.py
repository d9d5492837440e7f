"""Scores from pairwise votes: a Thurstone / Bradley-Terry MAP fit per query, Elo scaling and cross-query anchoring.

zELO (ZeroEntropy, arXiv 2509.12541): judges' pairwise preferences are turned into one continuous score per
document, which a student then regresses on.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, log_expit, log_ndtr

from research.data.votes import Vote
from research.errors import DataFormatError
from research.io import iter_jsonl, require_field, write_jsonl
from research.progress import track

ELO_PER_NAT = 400.0 / math.log(10.0)  # Elo: P(a beats b) = 1 / (1 + 10 ** (-(elo_a - elo_b) / 400))


class PairwiseModel(ABC):
    """A paired-comparison model P(a beats b) = F(s_a - s_b) with F(-d) = 1 - F(d) (David 1988, ch. 1)."""

    name: ClassVar[str]
    logit_scale: ClassVar[float]  # logit(F(d)) ~= logit_scale * d, which puts scores on the Elo scale

    @abstractmethod
    def log_cdf(self, d: np.ndarray) -> np.ndarray:
        """log F(d), stable in both tails."""

    @abstractmethod
    def dlog_cdf(self, d: np.ndarray) -> np.ndarray:
        """d/dd log F(d) = F'(d) / F(d)."""

    def cdf(self, d: np.ndarray) -> np.ndarray:
        return np.exp(self.log_cdf(d))

    def to_elo(self, scores: np.ndarray) -> np.ndarray:
        """Latent scores to Elo points: 400 log10(odds) with logit ~= ``logit_scale`` * score."""
        return np.asarray(scores, dtype=float) * (self.logit_scale * ELO_PER_NAT)


class ThurstoneModel(PairwiseModel):
    """Thurstone Case V, F = Phi; logit ~= 1.702 probit (Haley 1952: max |Phi(d) - sigmoid(1.702 d)| < 0.01)."""

    name = "thurstone"
    logit_scale = 1.702

    def log_cdf(self, d: np.ndarray) -> np.ndarray:
        return log_ndtr(d)

    def dlog_cdf(self, d: np.ndarray) -> np.ndarray:
        return np.exp(-0.5 * d * d - 0.5 * math.log(2 * math.pi) - log_ndtr(d))


class BradleyTerryModel(PairwiseModel):
    """Bradley-Terry: F = logistic, so scores are natural-log odds (Bradley & Terry 1952)."""

    name = "bradley-terry"
    logit_scale = 1.0

    def log_cdf(self, d: np.ndarray) -> np.ndarray:
        return log_expit(d)

    def dlog_cdf(self, d: np.ndarray) -> np.ndarray:
        return expit(-d)


MODELS: dict[str, PairwiseModel] = {m.name: m for m in (ThurstoneModel(), BradleyTerryModel())}


def get_model(model: PairwiseModel | str) -> PairwiseModel:
    """A model instance, or the registered one named ``"thurstone"`` / ``"bradley-terry"``."""
    if isinstance(model, PairwiseModel):
        return model
    try:
        return MODELS[model]
    except KeyError:
        raise ValueError(f"unknown pairwise model {model!r}; choose from {sorted(MODELS)}") from None


def neg_log_posterior(
    scores: np.ndarray, pairs_idx: np.ndarray, p: np.ndarray, model: PairwiseModel, prior_strength: float,
) -> tuple[float, np.ndarray]:
    """-sum_m [p_m log F(d_m) + (1 - p_m) log F(-d_m)] + prior_strength/2 ||s||^2, d = s_a - s_b, and its gradient."""
    a, b = pairs_idx[:, 0], pairs_idx[:, 1]
    d = scores[a] - scores[b]
    value = -np.sum(p * model.log_cdf(d) + (1 - p) * model.log_cdf(-d)) + 0.5 * prior_strength * scores @ scores
    dd = -(p * model.dlog_cdf(d) - (1 - p) * model.dlog_cdf(-d))
    n = len(scores)
    grad = np.bincount(a, dd, minlength=n) - np.bincount(b, dd, minlength=n) + prior_strength * scores
    return float(value), grad


def fit_query(
    doc_ids: Sequence[str], pairs_idx: np.ndarray, p: np.ndarray,
    model: PairwiseModel | str = "thurstone", prior_strength: float = 0.01, tol: float = 1e-10,
) -> np.ndarray:
    """Centred MAP latent scores of ``doc_ids`` from soft outcomes ``p[m]`` = P(pairs_idx[m, 0] beats pairs_idx[m, 1]).

    The Gaussian prior (precision ``prior_strength``) keeps unanimous winners and disconnected graphs finite.
    Repeated pairs add their evidence. L-BFGS-B with the analytic gradient of :func:`neg_log_posterior`.
    """
    model = get_model(model)
    n = len(doc_ids)
    pairs_idx = np.asarray(pairs_idx, dtype=np.int64).reshape(-1, 2)
    p = np.asarray(p, dtype=float).reshape(-1)
    if len(p) != len(pairs_idx):
        raise ValueError(f"fit_query: {len(pairs_idx)} pairs but {len(p)} outcomes")
    if len(p) and (pairs_idx.min() < 0 or pairs_idx.max() >= n or np.any(pairs_idx[:, 0] == pairs_idx[:, 1])):
        raise ValueError(f"fit_query: pair indices must be distinct and in [0, {n})")
    if not np.all(np.isfinite(p) & (p >= 0) & (p <= 1)):
        raise ValueError("fit_query: outcomes p must be probabilities in [0, 1]")
    if not prior_strength >= 0:
        raise ValueError(f"fit_query: prior_strength must be >= 0, got {prior_strength}")
    if n == 0 or len(p) == 0:
        return np.zeros(n)
    result = minimize(neg_log_posterior, np.zeros(n), args=(pairs_idx, p, model, prior_strength), jac=True,
                      method="L-BFGS-B", options={"maxiter": 20 * n + 200, "ftol": 1e-15, "gtol": tol})
    worst = float(np.max(np.abs(result.jac)))
    if not result.success and worst > 1e-5:
        warnings.warn(f"fit_query: L-BFGS-B stopped early ({result.message}); max |gradient| {worst:.2e}",
                      RuntimeWarning, stacklevel=2)
    return result.x - result.x.mean()


def elo_to_target(elo: np.ndarray | float) -> np.ndarray:
    """Elo points to a [0, 1] target: 1 / (1 + 10^(-elo/400)), the win probability against a 0-Elo reference."""
    return expit(np.asarray(elo, dtype=float) / ELO_PER_NAT)


def probability_to_elo(prob: np.ndarray | float, eps: float = 1e-4) -> np.ndarray:
    """A probability (clipped to [eps, 1 - eps]) as Elo, 400 log10(prob / (1 - prob)): inverse of elo_to_target."""
    prob = np.clip(np.asarray(prob, dtype=float), eps, 1 - eps)
    return ELO_PER_NAT * (np.log(prob) - np.log1p(-prob))


def normalize_across_queries(
    elo: Mapping[str, Mapping[str, float]], anchors: Mapping[tuple[str, str], float] | None = None,
) -> dict[str, dict[str, float]]:
    """Shift each query's Elo scores (defined only up to a constant) onto one cross-query scale.

    A query with anchored documents (``anchors[(query_id, doc_id)]``: an absolute probability of relevance, e.g. a
    calibrated pointwise judge) takes the least-squares shift, mean over those documents of
    probability_to_elo(anchor) - elo, so its Elo matches the anchors' logits on average; a query without anchors is
    centred at 0 Elo, so that a document of average relevance for its query gets target 0.5.
    """
    anchors = anchors or {}
    out: dict[str, dict[str, float]] = {}
    for query_id, docs in elo.items():
        ids = list(docs)
        values = np.array([docs[d] for d in ids], dtype=float)
        anchored = [i for i, d in enumerate(ids) if (query_id, d) in anchors]
        if anchored:
            target = probability_to_elo([anchors[(query_id, ids[i])] for i in anchored])
            shift = float(np.mean(target - values[anchored]))
        else:
            shift = -float(values.mean()) if len(values) else 0.0
        out[query_id] = {d: float(v + shift) for d, v in zip(ids, values)}
    return out


def fit_votes(
    votes: Iterable[Vote], model: PairwiseModel | str = "thurstone", prior_strength: float = 0.01,
    anchors: Mapping[tuple[str, str], float] | None = None,
) -> list[dict[str, Any]]:
    """Fit every query's votes, map to Elo, normalise across queries: records {query_id, doc_id, elo, target}.

    Queries and their documents keep their order of first appearance in ``votes``.
    """
    model = get_model(model)
    for key, value in (anchors or {}).items():
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"fit_votes: anchor {key} = {value!r} is not a probability in [0, 1]")
    grouped: dict[str, list[Vote]] = {}
    for vote in votes:
        grouped.setdefault(vote.query_id, []).append(vote)
    elo: dict[str, dict[str, float]] = {}
    for query_id, query_votes in track(grouped.items(), "fitting", total=len(grouped), unit="queries"):
        index: dict[str, int] = {}
        for vote in query_votes:
            index.setdefault(vote.doc_a, len(index))
            index.setdefault(vote.doc_b, len(index))
        pairs_idx = np.array([(index[v.doc_a], index[v.doc_b]) for v in query_votes], dtype=np.int64)
        scores = fit_query(list(index), pairs_idx, np.array([v.p for v in query_votes]), model, prior_strength)
        elo[query_id] = dict(zip(index, model.to_elo(scores).tolist()))
    normalized = normalize_across_queries(elo, anchors)
    return [{"query_id": query_id, "doc_id": doc_id, "elo": value, "target": float(elo_to_target(value))}
            for query_id, docs in normalized.items() for doc_id, value in docs.items()]


def write_scores(path: str | Path, records: Iterable[Mapping[str, Any]]) -> int:
    """Write score records as JSONL, atomically; returns the number of lines."""
    return write_jsonl(path, ({"query_id": r["query_id"], "doc_id": r["doc_id"], "elo": float(r["elo"]),
                               "target": float(r["target"])} for r in records))


def read_scores(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate a scores file written by :func:`write_scores`; errors name the file, line and field."""
    records = []
    for line, record in iter_jsonl(path):
        query_id, doc_id = (require_field(record, name, str, path, line) for name in ("query_id", "doc_id"))
        elo, target = (require_field(record, name, (int, float), path, line) for name in ("elo", "target"))
        if not math.isfinite(elo):
            raise DataFormatError(path, line, "elo", f"{elo!r} is not finite")
        if not (math.isfinite(target) and 0.0 <= target <= 1.0):
            raise DataFormatError(path, line, "target", f"{target!r} is not in [0, 1]")
        records.append({"query_id": query_id, "doc_id": doc_id, "elo": float(elo), "target": float(target)})
    return records
