"""Score interpolation: a hand-worked example and a numpy reference; the weight chosen on validation queries."""

from __future__ import annotations

import numpy as np
import pytest

from research.eval.metrics import compute_metrics
from research.retrieval.fusion import WEIGHT_GRID, choose_weight, interpolate, zscore


def test_hand_worked_example():
    # re-ranker: a=2, b=0 -> z a=+1, b=-1; first stage: a=1, b=3, c=5 (c not re-ranked) -> mean 3, std sqrt(8/3)
    reranked = {"q": {"a": 2.0, "b": 0.0}}
    first = {"q": {"a": 1.0, "b": 3.0, "c": 5.0}}
    s = (8 / 3) ** 0.5
    fused = interpolate(reranked, first, weight=0.25)
    assert set(fused["q"]) == {"a", "b"}
    assert fused["q"]["a"] == pytest.approx(0.25 * 1 + 0.75 * (-2 / s))
    assert fused["q"]["b"] == pytest.approx(0.25 * -1 + 0.75 * 0.0)
    # weight 1 keeps the re-ranker's order, weight 0 the first stage's
    assert interpolate(reranked, first, 1.0)["q"]["a"] > interpolate(reranked, first, 1.0)["q"]["b"]
    assert interpolate(reranked, first, 0.0)["q"]["a"] < interpolate(reranked, first, 0.0)["q"]["b"]


def test_matches_numpy_and_fills_missing_with_the_floor():
    rng = np.random.default_rng(0)
    docs = [f"d{i}" for i in range(20)]
    reranked = {"q": dict(zip(docs, rng.normal(size=20).tolist()))}
    first = {"q": dict(zip(docs[:15], rng.gamma(2.0, 5.0, size=15).tolist()))}
    fused = interpolate(reranked, first, weight=0.6)["q"]
    r = np.array(list(reranked["q"].values()))
    f = np.array(list(first["q"].values()))
    zr = (r - r.mean()) / r.std()
    zf = (f - f.mean()) / f.std()
    expected = 0.6 * zr + 0.4 * np.concatenate([zf, np.full(5, zf.min())])
    np.testing.assert_allclose([fused[d] for d in docs], expected, rtol=1e-12, atol=1e-12)


def test_constant_scores_and_bad_weight():
    assert zscore({"a": 3.0, "b": 3.0}) == {"a": 0.0, "b": 0.0}
    assert zscore({}) == {}
    with pytest.raises(ValueError, match="weight"):
        interpolate({"q": {"a": 1.0}}, {}, weight=1.5)


def test_choose_weight_hand_worked():
    # re-ranker b=2 > a=1 > c=-3, first stage c=2 > a=1 > b=-3; only a is relevant. Both z-score sets are
    # {+0.463, +0.926, -1.389} (std sqrt(14/3)), so the fused a = 0.463 at every w, b = 2.315 w - 1.389 and
    # c = 0.926 - 2.315 w: a is first iff 0.2 < w < 0.8 (a tie at 0.2 and 0.8 exactly), and the tie rule takes 0.7.
    reranked = {"q": {"a": 1.0, "b": 2.0, "c": -3.0}}
    first = {"q": {"a": 1.0, "b": -3.0, "c": 2.0}}
    weight, curve = choose_weight(reranked, first, {"q": {"a": 1}})
    assert weight == 0.7 and list(curve) == list(WEIGHT_GRID)
    assert [w for w, v in curve.items() if v == pytest.approx(1.0)] == [0.3, 0.4, 0.5, 0.6, 0.7]
    assert curve[0.0] < 1.0 and curve[1.0] < 1.0


def test_choose_weight_curve_equals_a_brute_force_evaluation():
    rng = np.random.default_rng(3)
    docs = [f"d{i}" for i in range(12)]
    reranked = {f"q{j}": {d: float(rng.normal()) for d in docs} for j in range(8)}
    first = {q: {d: float(rng.normal() * 5 + 10) for d in docs} for q in reranked}
    qrels = {q: {d: int(rng.integers(0, 3)) for d in rng.choice(docs, 3, replace=False)} for q in reranked}
    weights = (0.0, 0.25, 0.5, 1.0)
    weight, curve = choose_weight(reranked, first, qrels, metric="RR@10", weights=weights, relevance_level=2)
    brute = {w: compute_metrics(interpolate(reranked, first, w), qrels, metrics=("RR@10",), relevance_level=2)
             .aggregate["RR@10"] for w in weights}
    assert curve == brute and weight == max(weights, key=lambda w: (brute[w], w))
    with pytest.raises(ValueError, match="at least one"):
        choose_weight(reranked, first, qrels, weights=())
