"""Score interpolation: a hand-worked example and a numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

from research.retrieval.fusion import interpolate, zscore


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
