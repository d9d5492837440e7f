"""Reports: mean ± std over seeds, seed-averaged per-query values, the paired t-test and randomization test (checked
against hand computations and scipy), Holm's adjustment, CSV/markdown/PNG outputs."""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from research.errors import ResearchError
from research.eval.significance import holm, paired_randomization_test, paired_ttest
from research.runs.report import find_runs, make_report, summarize

QUERIES = [f"q{i}" for i in range(8)]


def make_run(root: Path, label_value: str, seed: int, per_query: dict[str, float], max_steps: int = 25) -> Path:
    """A finished sweep run folder as `research sweep` leaves it."""
    params = {"model.init_args.loss.class_path": f"research.losses.{label_value}"}
    run_dir = root / f"{label_value}-s{seed}-0000"
    (run_dir / "eval_after").mkdir(parents=True)
    per = {q: {"nDCG@10": v, "RR@10": min(1.0, v + 0.1)} for q, v in per_query.items()}
    aggregate = {m: float(np.mean([p[m] for p in per.values()])) for m in ("nDCG@10", "RR@10")}
    (run_dir / "eval_after" / "per_query.json").write_text(json.dumps(per))
    (run_dir / "eval_after" / "metrics.json").write_text(json.dumps({**aggregate, "num_queries": len(per), "split": "test"}))
    (run_dir / "sweep_run.json").write_text(json.dumps({"run_id": run_dir.name, "params": params, "swept": params,
                                                        "seed": seed, "label": label_value}))
    (run_dir / "FINISHED").write_text(json.dumps({"seconds": 60.0 * seed}))
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"seed_everything": seed, "trainer": {"max_steps": max_steps},
                                                         "data": {"init_args": {"batch_size": 32}}}))
    return run_dir


@pytest.fixture()
def sweep_dir(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "sweeps" / "toy"
    base = rng.uniform(0.2, 0.8, size=len(QUERIES))
    values = {}
    for label, shift in (("InfoNCE", 0.0), ("TripletLoss", -0.15), ("ListNet", 0.01)):
        for seed in (1, 2, 3):
            noise = rng.normal(0, 0.02, size=len(QUERIES))
            per_query = dict(zip(QUERIES, np.clip(base + shift + noise, 0, 1).round(6).tolist()))
            values[(label, seed)] = per_query
            make_run(root, label, seed, per_query)
    # an unfinished run (no FINISHED marker) is left out
    unfinished = make_run(root, "SymmetricInfoNCE", 1, dict(zip(QUERIES, base.tolist())))
    (unfinished / "FINISHED").unlink()
    return root, values


# ---------------------------------------------------------------- statistics
def test_paired_ttest_matches_hand_computation_and_scipy():
    a = np.array([0.5, 0.7, 0.2, 0.9, 0.4, 0.6])
    b = np.array([0.4, 0.5, 0.3, 0.6, 0.4, 0.3])
    d = a - b
    t_hand = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    p_hand = 2 * stats.t.sf(abs(t_hand), df=len(d) - 1)
    t, p = paired_ttest(a, b)
    assert t == pytest.approx(t_hand) and p == pytest.approx(p_hand)
    assert p == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert paired_ttest(a, a) == (0.0, 1.0)
    assert paired_ttest(a + 0.05, a) == (math.inf, 0.0)
    assert all(math.isnan(x) for x in paired_ttest([0.1], [0.2]))


def test_randomization_test_exact_matches_enumeration_and_scipy():
    a = np.array([0.5, 0.7, 0.2, 0.9, 0.4, 0.6, 0.1])
    b = np.array([0.4, 0.5, 0.3, 0.6, 0.4, 0.3, 0.15])
    d = a - b
    observed = abs(d.mean())
    flips = [abs(np.mean(np.array(signs) * d)) for signs in itertools.product([1, -1], repeat=len(d))]
    p_hand = np.mean([f >= observed - 1e-12 for f in flips])
    p = paired_randomization_test(a, b, permutations=10000)
    assert p == pytest.approx(p_hand)
    reference = stats.permutation_test((a, b), lambda x, y: np.mean(x - y), permutation_type="samples",
                                       n_resamples=np.inf, alternative="two-sided")
    assert p == pytest.approx(reference.pvalue)
    assert paired_randomization_test(a, a) == 1.0


def test_randomization_test_sampled_agrees_with_scipy():
    rng = np.random.default_rng(1)
    a = rng.uniform(size=60)
    b = a - rng.normal(0.03, 0.1, size=60)
    p = paired_randomization_test(a, b, permutations=20000, seed=0)
    reference = stats.permutation_test((a, b), lambda x, y: np.mean(x - y), permutation_type="samples",
                                       n_resamples=20000, alternative="two-sided", random_state=0)
    assert abs(p - reference.pvalue) < 0.01
    assert 1 / 20001 <= p <= 1
    assert paired_randomization_test(a, b, permutations=2000, seed=5) == paired_randomization_test(a, b, 2000, seed=5)


def test_holm_adjustment():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, math.nan, 0.01]) == pytest.approx([0.5, math.nan, 0.02], nan_ok=True)


# ---------------------------------------------------------------- gathering and summarising
def test_summary_means_stds_and_seed_averaged_per_query(sweep_dir):
    root, values = sweep_dir
    runs = find_runs(root)
    assert len(runs) == 9  # the unfinished run is left out
    summaries = {s.label: s for s in summarize(runs, ["nDCG@10"])}
    assert set(summaries) == {"InfoNCE", "TripletLoss", "ListNet"}
    for label, summary in summaries.items():
        run_means = [np.mean(list(values[(label, seed)].values())) for seed in (1, 2, 3)]
        assert summary.mean["nDCG@10"] == pytest.approx(np.mean(run_means))
        assert summary.std["nDCG@10"] == pytest.approx(np.std(run_means, ddof=1))
        assert summary.seeds == [1, 2, 3]
        for q in QUERIES:
            assert summary.per_query["nDCG@10"][q] == pytest.approx(np.mean([values[(label, s)][q] for s in (1, 2, 3)]))


def test_report_files_and_tests_against_baseline(sweep_dir, tmp_path):
    root, values = sweep_dir
    out = tmp_path / "report"
    result = make_report(root, baseline="infonce", metrics=["ndcg@10", "RR@10"], out=out, quiet=True)
    summaries = {s.label: s for s in result["summaries"]}
    assert result["baseline"].label == "InfoNCE"
    triplet = [np.mean([values[("TripletLoss", s)][q] for s in (1, 2, 3)]) for q in QUERIES]
    base = [np.mean([values[("InfoNCE", s)][q] for s in (1, 2, 3)]) for q in QUERIES]
    test = summaries["TripletLoss"].tests["nDCG@10"]
    assert test["p_ttest"] == pytest.approx(stats.ttest_rel(triplet, base).pvalue)
    assert test["p_perm"] == pytest.approx(paired_randomization_test(triplet, base))
    assert test["p_perm"] == pytest.approx(2 / 256)  # all 8 queries worse: only the two extreme sign patterns
    assert test["delta"] == pytest.approx(summaries["TripletLoss"].mean["nDCG@10"] - summaries["InfoNCE"].mean["nDCG@10"])
    assert test["queries"] == 8
    assert not summaries["InfoNCE"].tests

    rows = list(csv.DictReader((out / "report.csv").read_text().splitlines()))
    assert [r["configuration"] for r in rows] == ["InfoNCE", "ListNet", "TripletLoss"]  # no sweep file: by folder
    assert float(rows[2]["nDCG@10 mean"]) == pytest.approx(summaries["TripletLoss"].mean["nDCG@10"], abs=1e-6)
    assert float(rows[2]["nDCG@10 p_ttest"]) == pytest.approx(test["p_ttest"], rel=1e-5)
    assert rows[0]["nDCG@10 p_ttest"] == ""  # the baseline
    assert len(list(csv.DictReader((out / "runs.csv").read_text().splitlines()))) == 9
    text = (out / "report.md").read_text()
    assert "| InfoNCE (baseline) | 3 |" in text and "ttest_rel" in text and "randomization" in text
    assert "`max_steps=25`" in text and "`batch_size=32`" in text  # the fixed budget is stated
    (png,) = result["plots"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"![{png.stem}]({png.name})" in text


def test_reference_evaluation_is_a_row_and_a_line(sweep_dir, tmp_path):
    root, values = sweep_dir
    ref = tmp_path / "zero-shot" / "eval"
    ref.mkdir(parents=True)
    per = {q: {"nDCG@10": 0.4, "RR@10": 0.5} for q in QUERIES}
    (ref / "per_query.json").write_text(json.dumps(per))
    (ref / "metrics.json").write_text(json.dumps({"nDCG@10": 0.4, "RR@10": 0.5, "num_queries": 8}))
    result = make_report(root, baseline="InfoNCE", references=[f"zero-shot={ref.parent}"], out=tmp_path / "r", quiet=True)
    (reference,) = [s for s in result["summaries"] if s.reference]
    assert reference.label == "zero-shot" and reference.mean["nDCG@10"] == 0.4
    base = [np.mean([values[("InfoNCE", s)][q] for s in (1, 2, 3)]) for q in QUERIES]
    assert reference.tests["nDCG@10"]["p_ttest"] == pytest.approx(stats.ttest_rel([0.4] * 8, base).pvalue)
    text = (tmp_path / "r" / "report.md").read_text()
    assert "| zero-shot (reference) | — |" in text and "9 runs" in text
    with pytest.raises(ResearchError, match="NAME=DIR"):
        make_report(root, references=["nothing"], out=tmp_path / "r", quiet=True)


def test_baseline_by_run_id_and_errors(sweep_dir, tmp_path):
    root, _ = sweep_dir
    result = make_report(root, baseline="ListNet-s2-0000", out=tmp_path / "r", quiet=True)
    assert result["baseline"].label == "ListNet"
    with pytest.raises(ResearchError, match="matches 0"):
        make_report(root, baseline="Contrastive", out=tmp_path / "r", quiet=True)
    with pytest.raises(ResearchError, match="no runs found"):
        make_report(tmp_path / "nowhere", quiet=True)
    with pytest.raises(ResearchError, match="missing"):
        make_report(root, metrics=["R@100"], out=tmp_path / "r", quiet=True)


def test_plain_fit_runs_group_by_their_name(tmp_path):
    for name, shift in (("bi_encoder", 0.0), ("bi_encoder_lr", 0.05)):
        for seed in (1, 2):
            run = make_run(tmp_path / "grp" / name, "X", seed, {q: 0.5 + shift + 0.01 * seed for q in QUERIES})
            (run / "sweep_run.json").unlink()
            (run / "FINISHED").unlink()
            run.rename(run.parent / f"2026010{seed}-000000")
    runs = find_runs(tmp_path / "grp")
    assert sorted({r.label for r in runs}) == ["bi_encoder", "bi_encoder_lr"]
    assert sorted(r.seed for r in runs) == [1, 1, 2, 2]
    result = make_report("grp", root=tmp_path, baseline="bi_encoder", out=tmp_path / "out", quiet=True)
    other = [s for s in result["summaries"] if s.label == "bi_encoder_lr"][0]
    assert other.tests["nDCG@10"]["delta"] == pytest.approx(0.05)


def make_factorial_run(root: Path, labels: str, loss: str, per_query: dict[str, float]) -> Path:
    """A finished run of a 2x2 sweep with two bundle parameters (as experiments/sweeps/zelo_labels_losses_dev.yaml)."""
    params = {"labels": {"name": labels, "data.init_args.target_field": labels},
              "loss": {"name": loss, "model.init_args.loss": {"class_path": f"research.losses.{loss}"}}}
    run_dir = root / f"{labels}_{loss}-s1-0000"
    (run_dir / "eval_after").mkdir(parents=True)
    (run_dir / "eval_after" / "per_query.json").write_text(json.dumps({q: {"nDCG@10": v} for q, v in per_query.items()}))
    (run_dir / "eval_after" / "metrics.json").write_text(json.dumps({"nDCG@10": float(np.mean(list(per_query.values())))}))
    (run_dir / "sweep_run.json").write_text(json.dumps({"run_id": run_dir.name, "params": params, "swept": params,
                                                        "seed": 1, "label": f"labels={labels} loss={loss}"}))
    (run_dir / "FINISHED").write_text(json.dumps({"seconds": 1.0}))
    return run_dir


def test_one_factor_comparisons_of_a_factorial_sweep(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "sweeps" / "factorial"
    values = {}
    for labels, loss in itertools.product(("qrels", "zelo"), ("ListwiseSoftmaxCE", "PointwiseMSE")):
        values[labels, loss] = dict(zip(QUERIES, rng.uniform(0, 1, size=len(QUERIES)).round(6).tolist()))
        make_factorial_run(root, labels, loss, values[labels, loss])
    out = tmp_path / "report"
    comparisons = make_report(root, out=out, quiet=True, one_factor=True)["one_factor"]
    # a 2x2 has four one-change pairs; the diagonals (both changed) are not compared
    found = {(c.parameter, c.first.label, c.second.label): c for c in comparisons}
    assert len(found) == 4
    for (parameter, first, second), c in found.items():
        (a_labels, a_loss), (b_labels, b_loss) = [tuple(x.split("=")[1] for x in label.split()) for label in (first, second)]
        assert (a_loss == b_loss) == (parameter == "labels") and (a_labels == b_labels) == (parameter == "loss")
        x = [values[b_labels, b_loss][q] for q in QUERIES]
        y = [values[a_labels, a_loss][q] for q in QUERIES]
        test = c.tests["nDCG@10"]
        assert test["delta"] == pytest.approx(np.mean(x) - np.mean(y))
        assert test["p_ttest"] == pytest.approx(stats.ttest_rel(x, y).pvalue)
        assert test["p_perm"] == pytest.approx(paired_randomization_test(x, y))
        assert c.fixed == ({"loss": a_loss} if parameter == "labels" else {"labels": a_labels})
    adjusted = holm([c.tests["nDCG@10"]["p_perm"] for c in comparisons])
    assert [c.tests["nDCG@10"]["p_perm_holm"] for c in comparisons] == pytest.approx(adjusted)
    rows = list(csv.DictReader((out / "one_factor.csv").read_text().splitlines()))
    assert len(rows) == 4 and {r["parameter"] for r in rows} == {"labels", "loss"}
    assert "## One change at a time (nDCG@10)" in (out / "report.md").read_text()


def test_one_factor_needs_configurations_that_differ_in_one_parameter(sweep_dir, tmp_path):
    root = tmp_path / "sweeps" / "diagonal"
    make_factorial_run(root, "qrels", "ListwiseSoftmaxCE", dict.fromkeys(QUERIES, 0.5))
    make_factorial_run(root, "zelo", "PointwiseMSE", dict.fromkeys(QUERIES, 0.6))
    with pytest.raises(ResearchError, match="differ in exactly one parameter"):
        make_report(root, out=tmp_path / "r", quiet=True, one_factor=True)
    assert not (tmp_path / "r").exists()  # refused before anything is written
