"""The report of benchmarks/llm_exit_layers.py: from per-layer scores of dev and test candidates to the table, the
JSON and the figure, every choice (interpolation weight, calibration, adaptive-exit threshold) made on dev.

- Interpolation: per stage and layer, the weight ``w`` in 0, 0.1, ..., 1 of ``w * z(LLM) + (1 - w) * z(BM25)``
  (research.retrieval.fusion) with the best dev nDCG@10; test is scored at that weight.
- Paired tests on test's per-query nDCG@10: each stage and layer (raw and interpolated) against BM25, each trained
  stage against the untrained model at the same layer (raw against raw, interpolated against interpolated);
  randomization test p-values, Holm-adjusted over every test of the table.
- Adaptive exit: each stage's layers are calibrated on dev (research.models.llm_exit.fit_calibration on the qrels
  labels); a pair exits at the first layer with calibrated ``|log-odds| >= threshold`` (always by the last), which
  is exactly what ``score_adaptive`` computes (tested), so the curve is read off the one-pass scores. The threshold
  kept is the one with the fewest layers run on dev whose dev nDCG@10 is within ``TOLERANCE`` of the full depth's.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

# calibrated log-odds (most pairs sit near -3); the grid of the committed table (experiments/results/llm_layers)
THRESHOLDS = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0, 8.0, math.inf]
TOLERANCE = 0.01
METRICS = ("nDCG@10", "RR@10")


def scored_run(pairs, values):
    """The run of ``pairs`` scored ``values`` (a tensor row or a list)."""
    from research.data.candidates import pairs_to_run

    return pairs_to_run(pairs, [float(v) for v in values])


def evaluate(pairs, values, qrels):
    from research.eval.evaluation import evaluate_run

    return evaluate_run(scored_run(pairs, values), qrels, METRICS)


def interpolated(pairs, values, bm25, weight):
    from research.retrieval.fusion import interpolate

    return interpolate(scored_run(pairs, values), bm25, weight)


def labels(data, pairs) -> torch.Tensor:
    return torch.tensor([float(data.qrels.get(p.query_id, {}).get(p.doc_id, 0) >= 1) for p in pairs])


def simulate_adaptive(scores: torch.Tensor, calibration: dict, layers: list[int], threshold: float):
    """Calibrated score at each pair's exit layer and that layer: the first with ``|c| >= threshold``, else the last."""
    scale = torch.tensor([calibration[str(layer)][0] for layer in layers])
    bias = torch.tensor([calibration[str(layer)][1] for layer in layers])
    calibrated = scores * scale + bias
    confident = calibrated.abs() >= threshold
    confident[:, -1] = True
    first = confident.float().argmax(1)
    return calibrated[torch.arange(len(scores)), first], torch.tensor(layers)[first]


def adaptive_curve(data, pairs, scores, calibration, layers):
    curve = []
    for threshold in THRESHOLDS:
        final, exits = simulate_adaptive(scores, calibration, layers, threshold)
        curve.append({"threshold": threshold, "mean_layers_run": float(exits.float().mean()),
                      **evaluate(pairs, final, data.qrels).metrics.aggregate})
    return curve


def choose_threshold(splits, scores, layers, stage) -> dict:
    """The stage's dev calibration and its adaptive-exit threshold (module docstring)."""
    from research.models.llm_exit import fit_calibration

    data, _, pairs = splits["dev"]
    calibration = fit_calibration(scores[(stage, "dev")], labels(data, pairs), layers)
    curve = adaptive_curve(data, pairs, scores[(stage, "dev")], calibration, layers)
    full = curve[-1]["nDCG@10"]
    eligible = [point for point in curve if point["nDCG@10"] >= full - TOLERANCE]
    best = min(eligible, key=lambda point: (point["mean_layers_run"], -point["nDCG@10"]))
    return {"stage": stage, "calibration": calibration, "threshold": best["threshold"], "dev_curve": curve}


def significance(tests: dict[str, tuple[dict, dict]]) -> dict[str, dict]:
    """Per named comparison of per-query nDCG@10 (a, b): mean difference, t-test p, randomization p, Holm."""
    from research.eval.significance import holm, paired_randomization_test, paired_ttest

    out = {}
    for name, (a, b) in tests.items():
        queries = sorted(a)
        x, y = [a[q]["nDCG@10"] for q in queries], [b[q]["nDCG@10"] for q in queries]
        out[name] = {"delta": sum(x) / len(x) - sum(y) / len(y), "t_p": paired_ttest(x, y)[1],
                     "randomization_p": paired_randomization_test(x, y)}
    for name, p in zip(out, holm([v["randomization_p"] for v in out.values()])):
        out[name]["holm_p"] = p
    return out


def analyse(splits, scores, layers, stages) -> dict:
    """Every number of the report (see the module docstring)."""
    (dev, dev_bm25, dev_pairs), (test, test_bm25, test_pairs) = splits["dev"], splits["test"]
    from research.eval.evaluation import evaluate_run

    bm25_dev = evaluate_run(dev_bm25, dev.qrels, METRICS)
    bm25_test = evaluate_run(test_bm25, test.qrels, METRICS)
    from research.retrieval.fusion import choose_weight

    rows, per_query, tests, runs = {}, {}, {}, {}
    for stage in stages:
        for i, layer in enumerate(layers):
            dev_scores, test_scores = scores[(stage, "dev")][:, i], scores[(stage, "test")][:, i]
            weight, dev_fused = choose_weight(scored_run(dev_pairs, dev_scores), dev_bm25, dev.qrels)
            raw = evaluate(test_pairs, test_scores, test.qrels).metrics
            fused_run = interpolated(test_pairs, test_scores, test_bm25, weight)
            fused = evaluate_run(fused_run, test.qrels, METRICS).metrics
            runs[(stage, layer)] = (scored_run(test_pairs, test_scores), fused_run)
            rows[(stage, layer)] = {"test": raw.aggregate, "test_interpolated": fused.aggregate, "weight": weight,
                                    "dev": evaluate(dev_pairs, dev_scores, dev.qrels).metrics.aggregate,
                                    "dev_interpolated": dev_fused[weight]}
            per_query[(stage, layer)] = (raw.per_query, fused.per_query)
            tests[f"{stage} L{layer} vs BM25"] = (raw.per_query, bm25_test.metrics.per_query)
            tests[f"{stage} L{layer} interpolated vs BM25"] = (fused.per_query, bm25_test.metrics.per_query)
            if stage != "untrained":
                untrained = per_query[("untrained", layer)]
                tests[f"{stage} L{layer} vs untrained"] = (raw.per_query, untrained[0])
                tests[f"{stage} L{layer} interpolated vs untrained interpolated"] = (fused.per_query, untrained[1])
    adaptive = {}
    for stage in stages:
        choice = choose_threshold(splits, scores, layers, stage)
        test_curve = adaptive_curve(test, test_pairs, scores[(stage, "test")], choice["calibration"], layers)
        chosen = next(p for p in test_curve if p["threshold"] == choice["threshold"])
        final, _ = simulate_adaptive(scores[(stage, "dev")], choice["calibration"], layers, choice["threshold"])
        weight, _ = choose_weight(scored_run(dev_pairs, final), dev_bm25, dev.qrels)
        final, _ = simulate_adaptive(scores[(stage, "test")], choice["calibration"], layers, choice["threshold"])
        chosen_fused = evaluate_run(interpolated(test_pairs, final, test_bm25, weight), test.qrels, METRICS)
        adaptive[stage] = {**choice, "test_curve": test_curve, "test_chosen": chosen, "weight": weight,
                           "test_chosen_interpolated": chosen_fused.metrics.aggregate}
    return {"bm25": {"dev": bm25_dev.metrics.aggregate, "test": bm25_test.metrics.aggregate}, "rows": rows,
            "significance": significance(tests), "adaptive": adaptive, "runs": runs}


def markdown(result: dict, layers, stages, timing, header: str) -> str:
    rows, sig, bm25 = result["rows"], result["significance"], result["bm25"]["test"]
    seconds = timing["seconds_per_100"]
    names = " / ".join(stages)
    lines = [header, "", f"BM25 alone: nDCG@10 {bm25['nDCG@10']:.4f}, RR@10 {bm25['RR@10']:.4f} "
             f"(dev: {result['bm25']['dev']['nDCG@10']:.4f}, {result['bm25']['dev']['RR@10']:.4f}).", "",
             f"| exit layer | s / 100 docs | nDCG@10 {names} | RR@10 {names} | nDCG@10 interpolated {names} "
             f"(dev weight) | RR@10 interpolated {names} |", "|---:|---:|---|---|---|---|"]
    for layer in layers:
        def cells(key, metric):
            return " / ".join(f"{rows[(s, layer)][key][metric]:.4f}" for s in stages)
        weights = " / ".join(f"{rows[(s, layer)]['weight']:g}" for s in stages)
        lines.append(f"| {layer} | {seconds[layer]:.2f} | {cells('test', 'nDCG@10')} | {cells('test', 'RR@10')} | "
                     f"{cells('test_interpolated', 'nDCG@10')} ({weights}) | {cells('test_interpolated', 'RR@10')} |")
    lines += ["", "Paired tests on per-query nDCG@10 (test): Δ = mean difference; p = randomization test, Holm-adjusted "
              f"over all {len(sig)} tests (t-test p in results.json).", "",
              "| exit layer | " + " | ".join(f"{s} vs BM25 Δ (p) | {s} interp. vs BM25 Δ (p)" for s in stages)
              + "".join(f" | {s} vs untrained Δ (p) | {s} interp. vs untrained interp. Δ (p)" for s in stages[1:]) + " |",
              "|---:|" + "---|" * (2 * len(stages) + 2 * (len(stages) - 1))]
    for layer in layers:
        def cell(name):
            return f"{sig[name]['delta']:+.4f} ({sig[name]['holm_p']:.3g})"
        parts = [cell(f"{s} L{layer} vs BM25") + " | " + cell(f"{s} L{layer} interpolated vs BM25") for s in stages]
        parts += [cell(f"{s} L{layer} vs untrained") + " | " + cell(f"{s} L{layer} interpolated vs untrained interpolated")
                  for s in stages[1:]]
        lines.append(f"| {layer} | " + " | ".join(parts) + " |")
    lines += ["", "Chosen on dev (the exit layer with the best dev nDCG@10, raw and interpolated), scored on test:", "",
              "| stage | exit layer | dev nDCG@10 | test nDCG@10 | test RR@10 | interpolated: exit layer (weight) | "
              "dev nDCG@10 | test nDCG@10 | test RR@10 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for stage in stages:
        raw, fused = dev_choices(rows, layers, stage)
        r, f = rows[(stage, raw)], rows[(stage, fused)]
        lines.append(f"| {stage} | {raw} | {r['dev']['nDCG@10']:.4f} | {r['test']['nDCG@10']:.4f} | {r['test']['RR@10']:.4f} "
                     f"| {fused} ({f['weight']:g}) | {f['dev_interpolated']:.4f} | {f['test_interpolated']['nDCG@10']:.4f} "
                     f"| {f['test_interpolated']['RR@10']:.4f} |")
    lines += ["", "Adaptive exit (calibration and threshold chosen on dev; test nDCG@10 against mean decoder blocks run "
              "per document):", "", "| stage | threshold | mean layers run | nDCG@10 | RR@10 | nDCG@10 interpolated "
              "(dev weight) | threshold inf nDCG@10 |", "|---|---:|---:|---:|---:|---:|---:|"]
    for stage, adaptive in result["adaptive"].items():
        chosen, full = adaptive["test_chosen"], adaptive["test_curve"][-1]
        lines.append(f"| {stage} | {chosen['threshold']:g} | {chosen['mean_layers_run']:.1f} | {chosen['nDCG@10']:.4f} | "
                     f"{chosen['RR@10']:.4f} | {adaptive['test_chosen_interpolated']['nDCG@10']:.4f} ({adaptive['weight']:g}) "
                     f"| {full['nDCG@10']:.4f} |")
    lines += ["", "Adaptive against fixed exit, both chosen on dev by the same rule (the fewest layers whose dev nDCG@10 is "
              f"within {TOLERANCE:g} of the full depth's), scored on test:", "",
              "| stage | adaptive: mean layers run | adaptive: test nDCG@10 | fixed: exit layer | fixed: test nDCG@10 | "
              "layers saved by adaptive | test nDCG@10 adaptive − fixed |", "|---|---:|---:|---:|---:|---:|---:|"]
    for stage, adaptive in result["adaptive"].items():
        chosen, fixed = adaptive["test_chosen"], fixed_exit(rows, layers, stage)
        fixed_ndcg = rows[(stage, fixed)]["test"]["nDCG@10"]
        lines.append(f"| {stage} | {chosen['mean_layers_run']:.1f} | {chosen['nDCG@10']:.4f} | {fixed} | {fixed_ndcg:.4f} | "
                     f"{fixed - chosen['mean_layers_run']:+.1f} | {chosen['nDCG@10'] - fixed_ndcg:+.4f} |")
    real = timing.get("adaptive")
    if real:
        lines += ["", f"Measured adaptive pass ({timing['pairs']} test pairs, threshold {real['threshold']:g}): "
                  f"{real['seconds_per_100']:.2f} s / 100 docs, {real['mean_layers_run']:.1f} layers per document; "
                  f"{100 * real['same_exit_as_one_pass']:.0f} % of the pairs exit where the one-pass scores say, "
                  f"max |score difference| {real['max_abs_score_difference']:.2g}."]
    return "\n".join(lines) + "\n"


def dev_choices(rows: dict, layers, stage: str) -> tuple[int, int]:
    """The stage's exit layers with the best dev nDCG@10: raw, and interpolated with BM25 (at its dev weight)."""
    return (max(layers, key=lambda l: rows[(stage, l)]["dev"]["nDCG@10"]),
            max(layers, key=lambda l: rows[(stage, l)]["dev_interpolated"]))


def fixed_exit(rows: dict, layers, stage: str) -> int:
    """The shallowest fixed exit layer whose dev nDCG@10 is within ``TOLERANCE`` of the last layer's (the rule that
    chooses the adaptive threshold, so the two are compared at the same promise of quality)."""
    full = rows[(stage, layers[-1])]["dev"]["nDCG@10"]
    return min(layer for layer in layers if rows[(stage, layer)]["dev"]["nDCG@10"] >= full - TOLERANCE)


def plot(result: dict, layers, stages, timing, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (quality, cost, curve) = plt.subplots(1, 3, figsize=(16, 4.6))
    colors = dict(zip(stages, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    bm25 = result["bm25"]["test"]["nDCG@10"]
    for stage in stages:
        quality.plot(layers, [result["rows"][(stage, l)]["test"]["nDCG@10"] for l in layers], "o-", color=colors[stage],
                     label=stage)
        quality.plot(layers, [result["rows"][(stage, l)]["test_interpolated"]["nDCG@10"] for l in layers], "s--",
                     color=colors[stage], label=f"{stage} + BM25")
        points = result["adaptive"][stage]["test_curve"]
        curve.plot([p["mean_layers_run"] for p in points], [p["nDCG@10"] for p in points], ".-", color=colors[stage],
                   label=f"{stage} adaptive")
        curve.plot(layers, [result["rows"][(stage, l)]["test"]["nDCG@10"] for l in layers], "x:", color=colors[stage],
                   label=f"{stage} fixed exit")
    for ax in (quality, curve):
        ax.axhline(bm25, color="grey", linestyle="-.", label="BM25")
        ax.set_ylabel("nDCG@10 (test)")
        ax.legend(fontsize=7)
    quality.set_xlabel("exit layer")
    quality.set_title("quality by depth")
    cost.plot(layers, [timing["seconds_per_100"][l] for l in layers], "o-", color="black")
    cost.set_xlabel("exit layer")
    cost.set_ylabel("seconds per 100 documents")
    cost.set_title(f"cost by depth ({timing['pairs']} pairs, batch {timing['batch_size']})")
    curve.set_xlabel("mean decoder layers run per document")
    curve.set_title("adaptive vs fixed exit")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_report(out: Path, args, stages: dict, splits, scores, layers, timing, choice) -> None:
    from research.io import atomic_write, write_json

    out.mkdir(parents=True, exist_ok=True)
    names = list(stages)
    result = analyse(splits, scores, layers, names)
    test, dev = splits["test"], splits["dev"]
    header = (f"# Layer-wise LLM reranker on {args.data} ({args.test_split}: {len(test[0].qrels)} queries x BM25 top "
              f"{args.top_k} = {len(test[2])} pairs; choices on {args.dev_split}: {len(dev[0].qrels)} queries)\n\n"
              "Stages: " + ", ".join(f"{k} = `{v}`" for k, v in stages.items()) + f". Precision {args.precision}, "
              f"torch threads {torch.get_num_threads()}; regenerate: `bash experiments/scifact/llm_layers.sh`.")
    timing_summary = {k: v for k, v in timing.items() if k != "adaptive"}
    real = timing.get("adaptive")
    if real:  # the measured adaptive pass against the one read off the one-pass scores of the same pairs
        n = timing["pairs"]
        simulated, exits = simulate_adaptive(scores[(choice["stage"], "test")][:n], choice["calibration"], layers,
                                             real["threshold"])
        timing_summary["adaptive"] = {
            **{k: v for k, v in real.items() if k not in ("exits", "scores")},
            "same_exit_as_one_pass": float((exits == torch.tensor(real["exits"])).float().mean()),
            "max_abs_score_difference": float((simulated - torch.tensor(real["scores"])).abs().max())}
    text = markdown(result, layers, names, timing_summary, header)
    with atomic_write(out / "table.md") as handle:
        handle.write(text)
    write_json(out / "results.json", {
        "header": header, "args": vars(args), "stages": stages, "layers": layers, "bm25": result["bm25"],
        "rows": {f"{s} L{l}": v for (s, l), v in result["rows"].items()}, "significance": result["significance"],
        "adaptive": result["adaptive"], "timing": timing_summary, "timing_stage_choice": choice["stage"]})
    plot(result, layers, names, timing, out / "layers.png")
    write_test_runs(Path(args.work) / "runs", result["runs"], result["rows"])
    print(text)


def write_test_runs(folder: Path, runs: dict, rows: dict) -> None:
    """Every table cell's test run as a TREC file (``{stage}-L{layer}.trec`` and ``...-interpolated.trec``), so
    that ``research reproduce`` scores a cell from its run (experiments/baselines/scifact.yaml, row llm-layers)."""
    from research.data.trec import write_run

    folder.mkdir(parents=True, exist_ok=True)
    for (stage, layer), (raw, fused) in runs.items():
        write_run(folder / f"{stage}-L{layer}.trec", raw, tag=f"{stage}-L{layer}")
        write_run(folder / f"{stage}-L{layer}-interpolated.trec", fused, tag=f"{stage}-L{layer}-interpolated")
    for stage in dict.fromkeys(stage for stage, _ in runs):  # the cells chosen on dev (the table's "Chosen on dev")
        layers = sorted(layer for s, layer in runs if s == stage)
        raw, fused = dev_choices(rows, layers, stage)
        write_run(folder / f"{stage}-dev-chosen.trec", runs[(stage, raw)][0], tag=f"{stage}-L{raw}")
        write_run(folder / f"{stage}-dev-chosen-interpolated.trec", runs[(stage, fused)][1],
                  tag=f"{stage}-L{fused}-interpolated")


def render(out: Path) -> None:
    """Rewrite ``out``'s table.md and layers.png from its results.json (every number the report shows is in it), so
    that a change of the report's layout needs no new scoring pass."""
    from research.io import atomic_write

    saved = json.loads((out / "results.json").read_text(encoding="utf-8"))
    layers, stages = saved["layers"], list(saved["stages"])
    rows = {}
    for key, value in saved["rows"].items():
        stage, _, layer = key.rpartition(" L")
        rows[(stage, int(layer))] = value
    result = {"bm25": saved["bm25"], "rows": rows, "significance": saved["significance"], "adaptive": saved["adaptive"]}
    timing = {**saved["timing"], "seconds_per_100": {int(k): v for k, v in saved["timing"]["seconds_per_100"].items()}}
    header = saved.get("header")
    if header is None:  # a results.json written before the header was saved in it: keep the table's own
        header = "\n\n".join((out / "table.md").read_text(encoding="utf-8").split("\n\n")[:2])
    text = markdown(result, layers, stages, timing, header)
    with atomic_write(out / "table.md") as handle:
        handle.write(text)
    plot(result, layers, stages, timing, out / "layers.png")
    print(text)


if __name__ == "__main__":
    import argparse
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # research.* when run as a script
    parser = argparse.ArgumentParser(description="rewrite table.md and layers.png from results.json")
    parser.add_argument("out", nargs="?", default="experiments/results/llm_layers", help="folder with results.json")
    render(Path(parser.parse_args().out))
