"""Layer-wise LLM reranker on tiny random Llama and Qwen2 models: adaptive early exit, its calibration, the frozen
backbone's state cache and the LightningModule options built on it (heads-only training, every-layer ranking loss)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_llm_reranker import PAIRS, SHORT_INSTRUCTION, SHORT_QUESTION, load, tiny_causal_lm, tiny_tokenizer

from research.losses import ListwiseSoftmaxCE
from research.models.llm_exit import fit_calibration
from research.training.state_cache import CachedStates

QUERIES, DOCUMENTS = [q for q, _ in PAIRS] * 3, [d for _, d in PAIRS] * 2 + [d for _, d in reversed(PAIRS)]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_dir(request, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp(request.param)
    tokenizer = tiny_tokenizer()
    tiny_causal_lm(request.param, len(tokenizer), seed=3).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def count_rows(reranker) -> tuple[list[int], list]:
    """Block applications summed over rows: a block run on a batch of B pairs counts B."""
    rows = [0]

    def hook(module, args, output):
        rows[0] += (output[0] if isinstance(output, tuple) else output).shape[0]

    return rows, [block.register_forward_hook(hook) for block in reranker.decoder.layers]


# ---------------------------------------------------------------------------------------------------- adaptive exit
def test_adaptive_exit_thresholds_zero_inf_and_between(model_dir):
    reranker = load(model_dir, start_layer=1)  # scored layers 1, 2, 3, 4
    n, pairs = reranker.num_layers, len(QUERIES)
    every = reranker.score_layers(QUERIES, DOCUMENTS)  # [N, 4], one full pass
    rows, handles = count_rows(reranker)
    scores, exits = reranker.score_adaptive(QUERIES, DOCUMENTS, 0.0, batch_size=5)
    assert exits.tolist() == [1] * pairs and rows[0] == pairs  # threshold 0: every pair stops at layer 1
    torch.testing.assert_close(scores, every[:, 0], atol=1e-5, rtol=0)
    rows[0] = 0
    scores, exits = reranker.score_adaptive(QUERIES, DOCUMENTS, math.inf, batch_size=5)
    assert exits.tolist() == [n] * pairs and rows[0] == n * pairs  # inf: the exit layer, as score_pairs
    torch.testing.assert_close(scores, reranker.score_pairs(QUERIES, DOCUMENTS, exit_layer=n), atol=1e-5, rtol=0)
    # in between: each pair stops at its first confident layer, with that layer's one-pass score
    # about half the pairs stop at layer 1; the threshold lies midway between two pairs' layer-1 scores, because a pair
    # exactly at it (the median) could flip between a batch of 5 and the full pass by float rounding
    below, above = every[:, 0].abs().sort().values[pairs // 2 - 1: pairs // 2 + 1].tolist()
    assert above - below > 1e-4
    threshold = (below + above) / 2
    rows[0] = 0
    scores, exits = reranker.score_adaptive(QUERIES, DOCUMENTS, threshold, batch_size=5)
    for handle in handles:
        handle.remove()
    confident = every.abs() >= threshold
    expected_exit = [next((l + 1 for l in range(n) if confident[i, l]), n) for i in range(pairs)]
    assert exits.tolist() == expected_exit and 1 in expected_exit and len(set(expected_exit)) > 1
    torch.testing.assert_close(scores, every[torch.arange(pairs), exits - 1], atol=1e-5, rtol=0)
    assert rows[0] == sum(expected_exit) < n * pairs  # fewer blocks run than the full exit
    assert len(reranker.decoder.layers) == n  # restored, and Qwen2's per-layer mask kinds too
    assert len(getattr(reranker.decoder.config, "layer_types", None) or [None] * n) == n


def test_adaptive_exit_uses_the_calibration_and_stops_at_the_exit_layer(model_dir):
    reranker = load(model_dir, start_layer=1, layer_stride=2)  # scored layers 1, 3, 4
    every = reranker.score_layers(QUERIES, DOCUMENTS)
    reranker.config.calibration = {"1": [2.0, -0.5], "3": [-1.0, 0.25], "4": [0.5, 0.0]}
    scale = torch.tensor([2.0, -1.0, 0.5])
    calibrated = every * scale + torch.tensor([-0.5, 0.25, 0.0])
    threshold = float(calibrated[:, 0].abs().median())
    scores, exits = reranker.score_adaptive(QUERIES, DOCUMENTS, threshold, exit_layer=3)
    expected = [1 if abs(c) >= threshold else 3 for c in calibrated[:, 0].tolist()]  # never past the exit layer 3
    assert exits.tolist() == expected and set(expected) == {1, 3}
    column = torch.tensor([0 if e == 1 else 1 for e in expected])
    torch.testing.assert_close(scores, calibrated[torch.arange(len(QUERIES)), column], atol=1e-5, rtol=0)
    # score_pairs follows the config's rule, and set_exit checks what it is given
    reranker.set_exit(exit_layer=3, adaptive_threshold=threshold)
    reranker.exit_counts.clear()
    torch.testing.assert_close(reranker.score_pairs(QUERIES, DOCUMENTS), scores, atol=1e-5, rtol=0)
    assert reranker.exit_counts == {1: expected.count(1), 3: expected.count(3)}
    with pytest.raises(ValueError, match="has no head"):
        reranker.set_exit(exit_layer=2)
    with pytest.raises(ValueError, match=">= 0"):
        reranker.set_exit(adaptive_threshold=-1.0)
    reranker.config.calibration = {"1": [1.0, 0.0]}
    with pytest.raises(ValueError, match="no layer 3"):
        reranker.score_adaptive(QUERIES, DOCUMENTS, math.inf, exit_layer=3)


def test_fit_calibration_recovers_a_logistic_model():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(4000, 2, generator=generator) * 2
    truth = [(1.5, -1.0), (-0.5, 0.3)]
    labels = torch.stack([torch.bernoulli(torch.sigmoid(a * scores[:, i] + b), generator=generator)
                          for i, (a, b) in enumerate(truth)], 1)
    for i, (a, b) in enumerate(truth):  # one label column per layer: each layer's fit is its own regression
        fitted = fit_calibration(scores[:, i:i + 1], labels[:, i], [7])
        assert fitted["7"] == pytest.approx([a, b], abs=0.15)
    with pytest.raises(ValueError, match="both"):
        fit_calibration(scores, torch.zeros(4000), [1, 2])


# ---------------------------------------------------------------------------------------------------- state cache
def test_cached_states_equal_the_forward_and_are_computed_once(model_dir, tmp_path):
    reranker = load(model_dir, start_layer=2)
    reranker.model.requires_grad_(False)
    direct = reranker.score_texts(QUERIES, DOCUMENTS).detach()
    cache = CachedStates(reranker, tmp_path / "states", shard_size=3, batch_size=1)
    torch.testing.assert_close(cache.scores(QUERIES, DOCUMENTS).detach(), direct, atol=1e-5, rtol=0)
    unique = len(set(zip(QUERIES, DOCUMENTS)))
    assert cache.computed == unique == len(cache)
    cache.scores(QUERIES, DOCUMENTS)
    assert cache.computed == unique  # the second call reads the cache
    # shards of 3 are written as they fill: a run killed now leaves the unflushed rest to recompute
    written = unique - unique % 3
    again = CachedStates(reranker, tmp_path / "states", shard_size=3)
    torch.testing.assert_close(again.scores(QUERIES, DOCUMENTS).detach(), direct, atol=1e-5, rtol=0)
    assert again.computed == unique - written
    cache.flush()
    third = CachedStates(reranker, tmp_path / "states")
    third.scores(QUERIES, DOCUMENTS, layers=[2, 4])
    assert third.computed == 0 and not list((tmp_path / "states").rglob("*.tmp"))
    settings = json.loads(next((tmp_path / "states").glob("*/cache.json")).read_text())
    assert settings["layers"] == [2, 3, 4] and settings["precision"] == "off"
    # another prompt length or autocast is another key: nothing stale is read
    with torch.autocast("cpu", dtype=torch.bfloat16):
        third.scores(QUERIES[:2], DOCUMENTS[:2])
    assert third.computed == 2
    shorter = load(model_dir, start_layer=2, max_length=84)  # documents cut: other ids
    shorter.model.requires_grad_(False)
    other = CachedStates(shorter, tmp_path / "states")
    torch.testing.assert_close(other.scores(QUERIES, DOCUMENTS).detach(), shorter.score_texts(QUERIES, DOCUMENTS).detach(),
                               atol=1e-5, rtol=0)
    changed = {(q, d) for q, d in zip(QUERIES, DOCUMENTS) if shorter.pair_ids(q, d) != reranker.pair_ids(q, d)}
    assert other.computed == len(changed) and 0 < len(changed) < unique  # an uncut pair's state is the same state
    with pytest.raises(ValueError, match="frozen backbone"):
        CachedStates(load(model_dir, start_layer=2), tmp_path / "states")
    with pytest.raises(ValueError, match="not cached"):
        third.scores(QUERIES, DOCUMENTS, layers=[1])


def test_cached_scores_train_the_heads_only(model_dir, tmp_path):
    reranker = load(model_dir, start_layer=2)
    reranker.model.requires_grad_(False)
    cache = CachedStates(reranker, tmp_path)
    cache.scores(QUERIES[:4], DOCUMENTS[:4]).view(2, 2, 3)[..., -1].sum().backward()
    assert all(p.grad is None for p in reranker.model.parameters())
    assert reranker.heads.projections["4"].weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------- the module
def _module(path, **kwargs):
    from modules.llm_reranker import LLMRerankerModule

    options = dict(model=str(path), start_layer=2, lora_rank=0, max_length=96, query_max_length=16,
                   instruction=SHORT_INSTRUCTION, question=SHORT_QUESTION, lr=5e-2, warmup_ratio=0.0)
    return LLMRerankerModule(**{**options, **kwargs})


def _fit(module, beir, epochs):
    import lightning as L

    from datamodules.reranking import CandidateGroupsDataModule

    data = CandidateGroupsDataModule(str(beir), train_candidates="bm25", group_size=3, negative_rank_min=1,
                                     negative_rank_max=4, batch_size=2, eval_split="test", eval_candidates="bm25",
                                     eval_top_k=4, eval_batch_size=8)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0, max_epochs=epochs)
    trainer.fit(module, datamodule=data)
    logged = set(trainer.logged_metrics)
    trainer.test(module, datamodule=data, verbose=False)
    return logged


def test_module_options_are_checked(llama_dir_exit):
    with pytest.raises(ValueError, match="freeze_backbone"):
        _module(llama_dir_exit, cache_states=True)
    with pytest.raises(ValueError, match="lora_rank"):
        _module(llama_dir_exit, freeze_backbone=True, lora_rank=4)
    with pytest.raises(ValueError, match="readout: heads"):
        _module(llama_dir_exit, freeze_backbone=True, readout="lm_head")


def test_frozen_module_trains_its_heads_from_cached_states(llama_dir_exit, tiny_beir_dir, tmp_path):
    module = _module(llama_dir_exit, freeze_backbone=True, cache_states=True, state_cache_dir=str(tmp_path),
                     rank_every_layer=True)
    backbone = {k: v.clone() for k, v in module.reranker.model.state_dict().items()}
    heads = {k: v.clone() for k, v in module.reranker.heads.state_dict().items()}
    logged = _fit(module, tiny_beir_dir, epochs=3)
    assert {"train/rank_layer2", "train/rank_layer3", "train/rank_layer4"} <= logged
    assert all(torch.equal(v, module.reranker.model.state_dict()[k]) for k, v in backbone.items())
    assert any(not torch.equal(v, module.reranker.heads.state_dict()[k]) for k, v in heads.items())
    first = module.state_cache.computed
    assert first > 0 and module.last_evaluation is module.layer_evaluations[4]
    # the test run's scores equal a forward through the backbone with the trained heads
    pairs = list(module.last_evaluation.run.items())[:2]
    test = __import__("research.data.beir", fromlist=["load_dataset"]).load_dataset(tiny_beir_dir, "test")
    queries = [test.queries[q] for q, docs in pairs for _ in docs]
    documents = [test.corpus[d].full_text for _, docs in pairs for d in docs]
    direct = module.reranker.eval().score_pairs(queries, documents)
    torch.testing.assert_close(direct, torch.tensor([s for _, docs in pairs for s in docs.values()]), atol=1e-4, rtol=0)
    # the same run again (same seed, same batches) reads every state from disk
    again = _module(llama_dir_exit, freeze_backbone=True, cache_states=True, state_cache_dir=str(tmp_path),
                    rank_every_layer=True)
    _fit(again, tiny_beir_dir, epochs=3)
    assert again.state_cache.computed == 0


def test_rank_every_layer_is_the_mean_over_layers(llama_dir_exit):
    module = _module(llama_dir_exit, freeze_backbone=True, rank_every_layer=True, distill_weight=0.0)
    scores = torch.randn(2, 3, 3)
    targets, mask = torch.tensor([[1.0, 0, 0], [1.0, 0, 0]]), torch.ones(2, 3, dtype=torch.bool)
    terms = module.loss_terms(scores, targets, mask)
    per_layer = [ListwiseSoftmaxCE()(scores[..., i], targets, mask) for i in range(3)]
    torch.testing.assert_close(terms["ListwiseSoftmaxCE"], torch.stack(per_layer).mean())
    torch.testing.assert_close(terms["rank_layer3"], per_layer[1])
    torch.testing.assert_close(module.total(terms), torch.stack(per_layer).mean())


@pytest.fixture(scope="module")
def llama_dir_exit(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("llama_exit")
    tokenizer = tiny_tokenizer()
    tiny_causal_lm("llama", len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# ---------------------------------------------------------------------------------------------------- research rerank
def test_research_rerank_exit_flags(llama_dir_exit, tiny_beir_dir, tmp_path):
    from research.cli.main import main

    load(llama_dir_exit, start_layer=2).save_pretrained(tmp_path / "saved")  # scored layers 2, 3, 4
    common = ["rerank", "--model", str(tmp_path / "saved"), "--data", str(tiny_beir_dir), "--top-k", "3", "--batch-size", "4"]
    runs = {}
    for name, flags in {"fixed3": ["--exit-layer", "3"], "zero": ["--adaptive-exit", "0"],
                        "inf3": ["--exit-layer", "3", "--adaptive-exit", "inf"]}.items():
        assert main([*common, "--out", str(tmp_path / name), *flags]) == 0
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    pairs = sum(runs["fixed3"]["exit_counts"].values())
    assert runs["fixed3"]["exit_counts"] == {"3": pairs} and runs["fixed3"]["mean_layers_run"] == 3
    assert runs["zero"]["exit_counts"] == {"2": pairs} and runs["zero"]["mean_layers_run"] == 2
    assert runs["inf3"]["exit_counts"] == {"3": pairs} and runs["inf3"]["calibrated"] is False
    assert (tmp_path / "inf3" / "run.trec").read_text() == (tmp_path / "fixed3" / "run.trec").read_text()
    assert main([*common, "--out", str(tmp_path / "bad"), "--exit-layer", "1"]) != 0  # layer 1 has no head


# ---------------------------------------------------------------------------------------------------- the layer table
def test_exit_layer_benchmark_writes_the_table_from_cached_states(llama_dir_exit, tiny_beir_dir, tmp_path):
    from test_llm_reranker import perturb

    from benchmarks.llm_exit_layers import main
    from research.data.splits import write_dev_split

    data = write_dev_split(tiny_beir_dir, tmp_path / "beir-dev", dev_share=0.5)
    trained = load(llama_dir_exit, start_layer=2)
    perturb(trained.heads, 4, names=("weight",))
    trained.save_pretrained(tmp_path / "stage1")
    common = ["--model", str(llama_dir_exit), "--data", str(data), "--top-k", "4", "--start-layer", "2",
              "--layer-stride", "1", "--max-length", "96", "--query-max-length", "16", "--precision", "32-true",
              "--state-cache", str(tmp_path / "states"), "--timing-pairs", "6", "--work", str(tmp_path / "work")]
    # the untrained stage needs the tests' short prompt: a saved copy carries it
    load(llama_dir_exit, start_layer=2).save_pretrained(tmp_path / "untrained")
    common[1] = str(tmp_path / "untrained")
    main([*common, "--stage", f"stage1={tmp_path / 'stage1'}", "--out", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["layers"] == [2, 3, 4] and set(result["rows"]) == {f"{s} L{l}" for s in ("untrained", "stage1")
                                                                     for l in (2, 3, 4)}
    assert {"stage1 L4 vs untrained", "untrained L2 interpolated vs BM25"} <= set(result["significance"])
    assert all(0 <= v["weight"] <= 1 for v in result["rows"].values())
    assert result["timing"]["adaptive"]["same_exit_as_one_pass"] == 1.0  # the real pass exits where the simulation says
    assert (tmp_path / "out" / "layers.png").stat().st_size > 10_000
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| 4 |" in table and "Adaptive exit" in table
    # each cell's test run is written, and scores the cell's figure (research reproduce scores these files)
    from research.data.beir import load_dataset
    from research.data.trec import read_run
    from research.eval.metrics import compute_metrics

    qrels = load_dataset(data, "test").qrels
    for cell, key in (("stage1-L4-interpolated", "test_interpolated"), ("untrained-L2", "test")):
        scored = compute_metrics(read_run(tmp_path / "work" / "runs" / f"{cell}.trec"), qrels, ["nDCG@10"])
        name = cell.replace("-interpolated", "").replace("-L", " L")
        assert abs(scored.aggregate["nDCG@10"] - result["rows"][name][key]["nDCG@10"]) < 1e-12
    chosen = compute_metrics(read_run(tmp_path / "work" / "runs" / "stage1-dev-chosen-interpolated.trec"), qrels,
                             ["nDCG@10"]).aggregate["nDCG@10"]
    stage1_row = next(line for line in table.split("Chosen on dev")[1].splitlines() if line.startswith("| stage1 |"))
    assert stage1_row.endswith(f"| {chosen:.4f} | " + stage1_row.rsplit(" | ", 2)[-1])  # its interpolated test nDCG@10
    # the report re-renders from results.json alone, to the same table
    from benchmarks.llm_layers_report import render

    render(tmp_path / "out")
    assert (tmp_path / "out" / "table.md").read_text() == table
    # untrained and stage 1 share the frozen backbone: its states were computed once, for both splits
    states = sum(1 for _ in (tmp_path / "states").rglob("shard-*.safetensors"))
    main([*common, "--stage", f"stage1={tmp_path / 'stage1'}", "--out", str(tmp_path / "again")])  # resumes from work/
    assert (tmp_path / "again" / "table.md").read_text() == table
    assert sum(1 for _ in (tmp_path / "states").rglob("shard-*.safetensors")) == states
