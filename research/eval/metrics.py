"""IR evaluation metrics with trec_eval semantics: nDCG@k, RR@k, R@k, AP@k and P@k.

Each value equals trec_eval / pytrec_eval's (ndcg_cut_k, recip_rank on the run cut at k, recall_k,
map_cut_k, P_k). Documents are ranked by score descending, ties broken by doc id descending. nDCG uses
linear gain (every grade > 0 is gain, whatever ``relevance_level``), log2 discount and the ideal ranking of
all judged grades; the other metrics count a document relevant when its grade >= ``relevance_level``, and
R@k and AP@k divide by the number of relevant documents in qrels.

Convention (``queries_without_relevant``): by default (``"exclude"``) the mean is over the qrels queries with at
least one relevant document (grade >= ``relevance_level``); qrels queries with none are left out of the mean and
listed in ``skipped_queries``. With ``"trec_eval"`` the mean is over every qrels query, as trec_eval computes them:
a query without a relevant document scores 0 on RR, R, AP and P, and keeps its nDCG (gain from any grade > 0, so at
``relevance_level`` 2 a query with grade-1 documents only can have nDCG > 0). Either way a qrels query missing from
the run, or with an empty ranking, scores 0 on every metric (like ``trec_eval -c``; pytrec_eval leaves it out), and
run queries absent from qrels are ignored.

torchmetrics is not used: its retrieval MRR/MAP/recall (1.9) silently drop relevant documents scoring <= 0.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from research.data.trec import Qrels, Run, _trec_key

__all__ = ["MetricsResult", "compute_metrics", "parse_metric", "Qrels", "Run"]

DEFAULT_METRICS = ("nDCG@10", "RR@10", "R@100", "AP@100")
QUERIES_WITHOUT_RELEVANT = ("exclude", "trec_eval")
_FAMILIES = {"ndcg": "nDCG", "rr": "RR", "r": "R", "ap": "AP", "p": "P"}
_METRIC_RE = re.compile(r"^\s*([A-Za-z]+)@(\d+)\s*$")


@dataclass
class MetricsResult:
    """Mean (``aggregate``) and ``per_query`` values keyed by canonical metric name, e.g. ``"nDCG@10"``."""

    aggregate: dict[str, float]
    per_query: dict[str, dict[str, float]]
    num_queries: int
    skipped_queries: list[str] = field(default_factory=list)


def parse_metric(name: str) -> tuple[str, int]:
    """``"ndcg@10"`` → ``("nDCG", 10)``; the family is matched case-insensitively, ``k`` must be >= 1."""
    match = _METRIC_RE.match(name)
    family = _FAMILIES.get(match.group(1).lower()) if match else None
    if family is None or int(match.group(2)) < 1:
        raise ValueError(f"unknown metric {name!r}: expected one of nDCG@k, RR@k, R@k, AP@k, P@k with k >= 1")
    return family, int(match.group(2))


def _canonical(name: str) -> str:
    family, k = parse_metric(name)
    return f"{family}@{k}"


def _ranked_docs(scores: Mapping[str, float], depth: int) -> list[str]:
    docs = list(scores)
    values = np.fromiter(scores.values(), dtype=float, count=len(docs))
    if np.isnan(values).any():
        raise ValueError("run contains a NaN score")
    if len(docs) > depth:  # keep every document scoring at least the depth-th best, ties included
        keep = np.flatnonzero(values >= np.partition(values, len(docs) - depth)[len(docs) - depth])
        docs, values = [docs[i] for i in keep], values[keep]
    top = sorted(zip(docs, values.tolist()), key=_trec_key, reverse=True)[:depth]
    return [doc for doc, _ in top]


def _query_metrics(grades: np.ndarray, judged: Mapping[str, int], num_rel: int, level: int,
                   parsed: list[tuple[str, str, int]], discount: np.ndarray) -> dict[str, float]:
    n = len(grades)
    relevant = grades >= level
    cum_rel = np.cumsum(relevant)
    cum_dcg = np.cumsum(np.maximum(grades, 0) * discount[:n])
    cum_ap = np.cumsum(np.where(relevant, cum_rel / np.arange(1, n + 1), 0.0))
    ideal = np.sort(np.fromiter((g for g in judged.values() if g > 0), dtype=float, count=-1))[::-1]
    cum_idcg = np.cumsum(ideal[: len(discount)] * discount[: len(ideal)])  # more judged docs than the depth: cut
    first = int(np.argmax(relevant)) + 1 if relevant.any() else math.inf
    out = {}
    for name, family, k in parsed:
        last = min(k, n) - 1  # index of the last ranked document within the cutoff, -1 when none
        if family == "nDCG":
            idcg = cum_idcg[min(k, len(ideal)) - 1] if len(ideal) else 0.0
            value = cum_dcg[last] / idcg if last >= 0 and idcg > 0 else 0.0
        elif family == "RR":
            value = 1.0 / first if first <= k else 0.0
        elif family == "AP":
            value = cum_ap[last] / num_rel if last >= 0 and num_rel else 0.0
        else:
            hits = cum_rel[last] if last >= 0 else 0
            value = (hits / num_rel if num_rel else 0.0) if family == "R" else hits / k
        out[name] = float(value)
    return out


def compute_metrics(run: Mapping[str, Mapping[str, float]], qrels: Mapping[str, Mapping[str, int]],
                    metrics: Iterable[str] = DEFAULT_METRICS, relevance_level: int = 1,
                    queries_without_relevant: str = "exclude") -> MetricsResult:
    """Per-query and mean metrics of ``run`` against ``qrels`` under the convention of the module docstring;
    ``queries_without_relevant``: ``"exclude"`` (default) or ``"trec_eval"``."""
    if queries_without_relevant not in QUERIES_WITHOUT_RELEVANT:
        raise ValueError(f"queries_without_relevant must be one of {', '.join(QUERIES_WITHOUT_RELEVANT)}, "
                         f"got {queries_without_relevant!r}")
    names = list(dict.fromkeys(_canonical(name) for name in metrics))
    if not names:
        raise ValueError("no metrics requested")
    parsed = [(name, *parse_metric(name)) for name in names]
    depth = max(k for _, _, k in parsed)
    discount = 1.0 / np.log2(np.arange(2, depth + 2, dtype=float))
    per_query: dict[str, dict[str, float]] = {}
    skipped: list[str] = []
    for qid, judged in qrels.items():
        num_rel = sum(1 for grade in judged.values() if grade >= relevance_level)
        if num_rel == 0 and queries_without_relevant == "exclude":
            skipped.append(qid)
            continue
        docs = _ranked_docs(run.get(qid, {}), depth)
        grades = np.fromiter((judged.get(doc, 0) for doc in docs), dtype=float, count=len(docs))
        per_query[qid] = _query_metrics(grades, judged, num_rel, relevance_level, parsed, discount)
    count = len(per_query)
    aggregate = {name: (math.fsum(q[name] for q in per_query.values()) / count if count else 0.0) for name in names}
    return MetricsResult(aggregate, per_query, count, skipped)

