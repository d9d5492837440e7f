"""zELO statistical core: pair sampling, votes files, Thurstone / Bradley-Terry fits, Elo normalisation."""

from __future__ import annotations

import json
from collections import Counter

import choix
import numpy as np
import pytest
from scipy.optimize import check_grad
from scipy.stats import norm, spearmanr

from research.errors import DataFormatError
from research.seeds import key_seed
from research.zelo import (
    BradleyTerryModel,
    ThurstoneModel,
    Vote,
    append_votes,
    elo_to_target,
    fit_query,
    fit_votes,
    neg_log_posterior,
    normalize_across_queries,
    probability_to_elo,
    read_scores,
    read_votes,
    sample_pairs,
    voted_pairs,
    write_scores,
    write_votes,
)

MODELS = [ThurstoneModel(), BradleyTerryModel()]
IDS = [f"d{i}" for i in range(100)]


def _idx(pairs, ids=IDS):
    where = {d: i for i, d in enumerate(ids)}
    return np.array([(where[a], where[b]) for a, b in pairs], dtype=np.int64)


def _noisy_votes(seed, n=100, cycles=4, judges=3, noise=0.5):
    """Latent N(0, 1) scores; each judge reports Phi(s_a - s_b + N(0, noise^2)); p is the judges' mean."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=n)
    idx = _idx(sample_pairs(IDS[:n], cycles, seed), IDS[:n])
    d = latent[idx[:, 0]] - latent[idx[:, 1]]
    return latent, idx, norm.cdf(d[:, None] + rng.normal(0, noise, (len(d), judges))).mean(axis=1)


# ---- pairs -------------------------------------------------------------------------------------------------------

def test_cycles_cover_every_doc_with_degree_about_2k():
    pairs = sample_pairs(IDS, cycles=4, seed=0)
    assert len({frozenset(p) for p in pairs}) == len(pairs)
    assert all(a != b for a, b in pairs)
    assert 370 <= len(pairs) <= 400
    degree = Counter(d for pair in pairs for d in pair)
    assert set(degree) == set(IDS)
    assert 2 <= min(degree.values()) and max(degree.values()) <= 8
    assert np.mean(list(degree.values())) >= 7.5


def test_pairs_deterministic_by_seed_and_small_cases():
    assert sample_pairs(IDS, 4, seed=3) == sample_pairs(IDS, 4, seed=3)
    assert sample_pairs(IDS, 4, seed=3) != sample_pairs(IDS, 4, seed=4)
    assert sample_pairs([], 4) == [] and sample_pairs(["a"], 4) == []
    assert [frozenset(p) for p in sample_pairs(["a", "b"], 4)] == [frozenset("ab")]
    assert {frozenset(p) for p in sample_pairs(list("abc"), 1)} == {frozenset("ab"), frozenset("bc"), frozenset("ac")}
    assert sample_pairs(list("abcd"), all_pairs=True) == [tuple(p) for p in ("ab", "ac", "ad", "bc", "bd", "cd")]
    assert len(sample_pairs(IDS, all_pairs=True)) == 4950
    with pytest.raises(ValueError):
        sample_pairs(["a", "a"])
    with pytest.raises(ValueError):
        sample_pairs(IDS, cycles=0)


def test_key_seed_is_stable():
    assert key_seed(0, "q1") == 0xEB2B_5F41_0D4A_A3D0  # pinned: the same in every process and platform
    assert key_seed(0, "q1") != key_seed(1, "q1") and key_seed(0, "q1") != key_seed(0, "q2")
    assert 0 <= key_seed(7, "q") < 2**64


# ---- fit ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
def test_analytic_gradient_matches_finite_differences(model):
    rng = np.random.default_rng(0)
    idx = _idx(sample_pairs(IDS[:30], 3, seed=1), IDS[:30])
    p = rng.random(len(idx))
    for scale in (1.0, 8.0):  # 8: differences up to ~40, deep in the tails of F
        x = rng.normal(scale=scale, size=30)
        f = lambda s: neg_log_posterior(s, idx, p, model, 0.01)[0]  # noqa: E731
        g = lambda s: neg_log_posterior(s, idx, p, model, 0.01)[1]  # noqa: E731
        assert check_grad(f, g, x, epsilon=1e-6) <= 1e-4 * max(1.0, np.linalg.norm(g(x)))


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
def test_link_function_is_a_symmetric_cdf(model):
    d = np.linspace(-40, 40, 81)
    assert np.allclose(model.cdf(d) + model.cdf(-d), 1.0)
    assert np.all(np.isfinite(model.log_cdf(d))) and np.all(np.isfinite(model.dlog_cdf(d)))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
def test_synthetic_recovery(model, seed):
    latent, idx, p = _noisy_votes(seed)
    scores = fit_query(IDS, idx, p, model)
    assert abs(scores.mean()) < 1e-9
    assert spearmanr(scores, latent)[0] >= 0.95


def test_bradley_terry_matches_choix():
    """Same objective as choix.opt_pairwise, whose penalty is alpha * ||theta||^2, so alpha = prior_strength / 2."""
    rng = np.random.default_rng(5)
    latent = rng.normal(size=100)
    idx = np.repeat(_idx(sample_pairs(IDS, 4, seed=5)), 3, axis=0)
    won = rng.random(len(idx)) < 1 / (1 + np.exp(-(latent[idx[:, 0]] - latent[idx[:, 1]])))
    data = [(a, b) if w else (b, a) for (a, b), w in zip(idx.tolist(), won)]
    ours = fit_query(IDS, idx, won.astype(float), BradleyTerryModel(), prior_strength=0.01)
    theirs = choix.opt_pairwise(100, data, alpha=0.005, method="Newton-CG", tol=1e-12)
    assert np.max(np.abs(ours - (theirs - theirs.mean()))) <= 1e-4


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
def test_unanimous_and_disconnected_stay_finite(model):
    chain = np.array([[0, 1], [1, 2], [2, 3]])
    scores = fit_query(list("abcd"), chain, np.ones(3), model)
    assert np.all(np.isfinite(scores)) and np.all(np.diff(scores) < 0) and np.abs(scores).max() < 100
    islands = np.array([[0, 1], [2, 3], [4, 5]])  # three components, one disconnected doc (6)
    scores = fit_query(list("abcdefg"), islands, np.array([1.0, 0.0, 0.5]), model)
    assert np.all(np.isfinite(scores)) and scores[0] > scores[1] and scores[3] > scores[2]
    assert scores[4] == pytest.approx(scores[5], abs=1e-6)
    assert fit_query(list("ab"), np.zeros((0, 2)), np.zeros(0), model).tolist() == [0.0, 0.0]


def test_fit_query_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown pairwise model"):
        fit_query(list("ab"), [[0, 1]], [1.0], "elo")
    with pytest.raises(ValueError):
        fit_query(list("ab"), [[0, 2]], [1.0])
    with pytest.raises(ValueError):
        fit_query(list("ab"), [[0, 0]], [1.0])
    with pytest.raises(ValueError):
        fit_query(list("ab"), [[0, 1]], [1.5])


def test_elo_scale():
    bt, th = BradleyTerryModel(), ThurstoneModel()
    # Bradley-Terry: elo difference reproduces the model's win probability exactly.
    assert elo_to_target(bt.to_elo(np.array([1.3]))) == pytest.approx(bt.cdf(np.array([1.3])))
    # Thurstone: within the 1.702 logistic approximation (max error < 0.01).
    d = np.linspace(-5, 5, 101)
    assert np.max(np.abs(elo_to_target(th.to_elo(d)) - th.cdf(d))) < 0.01
    assert elo_to_target(400.0) == pytest.approx(10 / 11)
    assert probability_to_elo(10 / 11) == pytest.approx(400.0)


def test_normalize_across_queries():
    elo = {"q1": {"a": 100.0, "b": -50.0}, "q2": {"c": 30.0, "d": 10.0}}
    centred = normalize_across_queries(elo)
    assert centred["q1"] == {"a": 75.0, "b": -75.0} and centred["q2"] == {"c": 10.0, "d": -10.0}
    anchored = normalize_across_queries(elo, {("q1", "a"): 0.9, ("q1", "b"): 0.5})
    shift = np.mean([probability_to_elo(0.9) - 100.0, 0.0 + 50.0])
    assert anchored["q1"]["a"] == pytest.approx(100.0 + shift) and anchored["q1"]["b"] == pytest.approx(-50.0 + shift)
    assert anchored["q2"] == centred["q2"]


def test_fit_votes_records_and_scores_round_trip(tmp_path):
    latent, idx, p = _noisy_votes(0, n=20, cycles=3)
    votes = [Vote(q, IDS[a], IDS[b], float(x)) for q in ("q1", "q2") for (a, b), x in zip(idx, p)]
    records = fit_votes(votes, "thurstone", anchors={("q2", IDS[0]): 0.99})
    assert [r["query_id"] for r in records] == ["q1"] * 20 + ["q2"] * 20
    assert {r["doc_id"] for r in records} == set(IDS[:20])
    q1 = [r for r in records if r["query_id"] == "q1"]
    assert abs(np.mean([r["elo"] for r in q1])) < 1e-6
    assert spearmanr([r["elo"] for r in q1], latent[[int(r["doc_id"][1:]) for r in q1]])[0] > 0.9
    q2_top = next(r for r in records if r["query_id"] == "q2" and r["doc_id"] == IDS[0])
    assert q2_top["elo"] == pytest.approx(probability_to_elo(0.99))
    assert all(0 < r["target"] < 1 and r["target"] == pytest.approx(float(elo_to_target(r["elo"]))) for r in records)
    assert write_scores(tmp_path / "s.jsonl", records) == 40
    assert read_scores(tmp_path / "s.jsonl") == records


# ---- votes files -------------------------------------------------------------------------------------------------

def test_votes_round_trip_and_append(tmp_path):
    path = tmp_path / "votes.jsonl"
    votes = [Vote("q", "a", "b", 0.75, {"j1": 1.0, "j2": 0.5}), Vote("q", "b", "c", 0.0), Vote("q2", "é", "c", 1)]
    assert write_votes(path, votes[:2]) == 2
    assert append_votes(path, votes[2:]) == 1
    assert read_votes(path) == votes
    assert voted_pairs(votes) == {("q", frozenset("ab")), ("q", frozenset("bc")), ("q2", frozenset(("é", "c")))}


def test_truncated_tail_is_skipped_only_when_allowed_and_repaired_on_append(tmp_path):
    path = tmp_path / "votes.jsonl"
    write_votes(path, [Vote("q", "a", "b", 0.5), Vote("q", "b", "c", 0.25)])
    full = path.read_bytes()
    path.write_bytes(full[:-12])  # crash mid-line
    with pytest.raises(DataFormatError) as err:
        read_votes(path)
    assert err.value.line == 2
    assert read_votes(path, allow_truncated_tail=True) == [Vote("q", "a", "b", 0.5)]
    path.write_bytes(full[:-1] + "\n{\"query_id\": \"é".encode()[:-1])  # cut inside a UTF-8 character
    assert len(read_votes(path, allow_truncated_tail=True)) == 2
    append_votes(path, [Vote("q", "c", "d", 1.0)])
    assert [v.doc_b for v in read_votes(path)] == ["b", "c", "d"]
    path.write_bytes(full[:-1])  # complete last line, newline lost: kept, then newline-terminated on append
    assert len(read_votes(path)) == 2
    append_votes(path, [Vote("q", "c", "d", 1.0)])
    assert len(read_votes(path)) == 3
    path.write_bytes(b"not json\n" + full)  # a bad line that is not the tail is always an error
    with pytest.raises(DataFormatError):
        read_votes(path, allow_truncated_tail=True)


GOOD = {"query_id": "q", "doc_a": "a", "doc_b": "b", "p": 0.5}


@pytest.mark.parametrize("line, field", [
    ("{not json", None),
    (json.dumps([1, 2]), None),
    (json.dumps({k: v for k, v in GOOD.items() if k != "doc_a"}), "doc_a"),
    (json.dumps({**GOOD, "query_id": 3}), "query_id"),
    (json.dumps({**GOOD, "doc_b": ""}), "doc_b"),
    (json.dumps({**GOOD, "doc_b": "a"}), "doc_b"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "p"}), "p"),
    (json.dumps({**GOOD, "p": "0.5"}), "p"),
    (json.dumps({**GOOD, "p": True}), "p"),
    (json.dumps({**GOOD, "p": 1.5}), "p"),
    (json.dumps({**GOOD, "p": -0.1}), "p"),
    ('{"query_id": "q", "doc_a": "a", "doc_b": "b", "p": NaN}', "p"),
    (json.dumps({**GOOD, "judges": [0.5]}), "judges"),
    (json.dumps({**GOOD, "judges": {"j1": 0.5, "j2": 2.0}}), "judges.j2"),
    (json.dumps({**GOOD, "judges": {"j1": None}}), "judges.j1"),
])
def test_malformed_vote_lines_name_line_and_field(tmp_path, line, field):
    path = tmp_path / "votes.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + line + "\n" + json.dumps(GOOD) + "\n", encoding="utf-8")
    with pytest.raises(DataFormatError) as err:
        read_votes(path, allow_truncated_tail=True)
    assert (err.value.line, err.value.field) == (3, field)
    assert str(path) in str(err.value)


def test_vote_constructor_validates():
    with pytest.raises(ValueError):
        Vote("q", "a", "a", 0.5)
    with pytest.raises(ValueError):
        Vote("q", "a", "b", float("nan"))
