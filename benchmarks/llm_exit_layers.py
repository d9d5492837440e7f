"""The layer-wise LLM reranker's table: every scored layer's quality (raw and interpolated with BM25), cost and
adaptive-exit curve, untrained against trained stages, on a dev-carved BEIR folder's dev (choices) and test splits.

Steps (each resumable: the per-layer scores come from the shared state cache, which keeps every backbone pass):

1. BM25 top-``k`` candidates of every judged query of ``--dev-split`` and ``--test-split`` (``--queries``: the first
   N test queries in file order, 0 for all).
2. Per stage (``untrained``: ``--model`` with fresh heads, the LM head's yes-vs-no readout; then each
   ``--stage NAME=MODEL_DIR``), every scored layer's scores of every candidate pair from one pass, through
   :class:`~research.training.state_cache.CachedStates` (a LoRA stage is merged first: same scores, tested); a
   frozen backbone's states are shared by the stages that keep it (untrained and stage 1).
3. Seconds per 100 documents at each exit layer: ``score_pairs(exit_layer=l)`` on the first ``--timing-pairs`` test
   pairs (decoder blocks 1..l only), with the last stage's model; and one real adaptive-exit pass over the same pairs.
4. :mod:`benchmarks.llm_layers_report`: interpolation weights, calibration and thresholds chosen on dev, test
   metrics, paired tests, ``table.md``, ``results.json`` and ``layers.png`` in ``--out``.

    python benchmarks/llm_exit_layers.py --data runs/data/scifact-dev --top-k 20 \\
        --stage stage1=runs/llm_layers/stage1/model --stage stage2=runs/llm_layers/stage2/model \\
        --out experiments/results/llm_layers
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.*` when run as a script

import torch  # noqa: E402


def autocast(precision: str):
    if precision == "bf16-mixed":
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def load_stage(name: str, source: str, args):
    """The reranker of a stage, frozen for scoring (LoRA merged), in eval mode."""
    from research.models.llm_reranker import LayerwiseLLMReranker

    if name == "untrained":
        reranker = LayerwiseLLMReranker.from_pretrained(
            source, readout="heads", start_layer=args.start_layer, layer_stride=args.layer_stride,
            max_length=args.max_length, query_max_length=args.query_max_length)
    else:
        reranker = LayerwiseLLMReranker.from_pretrained(source)
    reranker.merge_lora()
    reranker.model.requires_grad_(False)
    return reranker.eval()


def layer_scores(reranker, data, pairs, args) -> torch.Tensor:
    """``[len(pairs), len(layers)]`` scores of every scored layer, the backbone passes kept in the state cache."""
    from research.training.state_cache import CachedStates

    cache = CachedStates(reranker, args.state_cache, shard_size=args.shard_size, batch_size=args.batch_size)
    out = []
    started = time.perf_counter()
    with torch.inference_mode(), autocast(args.precision):
        for start in range(0, len(pairs), args.shard_size):
            chunk = pairs[start:start + args.shard_size]
            out.append(cache.scores([data.queries[p.query_id] for p in chunk],
                                    [data.corpus[p.doc_id].full_text for p in chunk]).float().cpu())
            cache.flush()
            done = start + len(chunk)
            print(f"  {done}/{len(pairs)} pairs, {cache.computed} computed, {time.perf_counter() - started:.0f} s",
                  flush=True)
    return torch.cat(out)


def time_exits(reranker, data, pairs, args, threshold: float | None) -> dict:
    """Seconds per 100 documents per exit layer (best of ``--timing-repeats``) and of one adaptive pass."""
    queries = [data.queries[p.query_id] for p in pairs]
    documents = [data.corpus[p.doc_id].full_text for p in pairs]
    timings = {}
    with autocast(args.precision):
        reranker.score_pairs(queries[:4], documents[:4], batch_size=4, exit_layer=reranker.layers[0])  # warm-up
        for layer in reranker.layers:
            best = float("inf")
            for _ in range(args.timing_repeats):
                started = time.perf_counter()
                reranker.score_pairs(queries, documents, batch_size=args.timing_batch, exit_layer=layer)
                best = min(best, time.perf_counter() - started)
            timings[layer] = 100.0 * best / len(pairs)
            print(f"  exit layer {layer}: {timings[layer]:.2f} s / 100 documents", flush=True)
        adaptive = None
        if threshold is not None:
            started = time.perf_counter()
            scores, exits = reranker.score_adaptive(queries, documents, threshold, batch_size=args.timing_batch)
            adaptive = {"threshold": threshold, "seconds_per_100": 100.0 * (time.perf_counter() - started) / len(pairs),
                        "mean_layers_run": float(exits.float().mean()), "exits": exits.tolist(),
                        "scores": scores.tolist()}
    return {"seconds_per_100": timings, "adaptive": adaptive, "pairs": len(pairs), "batch_size": args.timing_batch}


def cached(path: Path, compute):
    """``compute()`` once; its result kept in ``path`` (torch.save, atomic) so that a re-run resumes."""
    if path.is_file():
        return torch.load(path, weights_only=False)
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(result, tmp)
    tmp.replace(path)
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="the untrained stage's backbone")
    parser.add_argument("--stage", action="append", default=[], metavar="NAME=MODEL_DIR", help="a trained stage (in order)")
    parser.add_argument("--data", default="runs/data/scifact-dev", help="BEIR folder with a dev and a test split")
    parser.add_argument("--dev-split", default="dev")
    parser.add_argument("--test-split", default="test")
    parser.add_argument("--queries", type=int, default=0, help="first N judged test queries (0: all)")
    parser.add_argument("--top-k", type=int, default=20, help="BM25 candidates re-ranked per query")
    parser.add_argument("--start-layer", type=int, default=6)
    parser.add_argument("--layer-stride", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--query-max-length", type=int, default=48)
    parser.add_argument("--precision", default="bf16-mixed", choices=("bf16-mixed", "32-true"))
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per backbone batch")
    parser.add_argument("--shard-size", type=int, default=256, help="pairs per state-cache shard (the resume grain)")
    parser.add_argument("--state-cache", default=None, help="state cache root (default $RESEARCH_CACHE_DIR/llm_states)")
    parser.add_argument("--timing-pairs", type=int, default=128)
    parser.add_argument("--timing-batch", type=int, default=16)
    parser.add_argument("--timing-repeats", type=int, default=3)
    parser.add_argument("--work", default="runs/llm_layers/bench", help="per-stage scores and timings (resumable)")
    parser.add_argument("--out", default="experiments/results/llm_layers", help="table.md, results.json, layers.png")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    import transformers

    from benchmarks.llm_layers_report import choose_threshold, write_report
    from research.data.beir import load_dataset
    from research.data.candidates import candidate_pairs
    from research.retrieval.bm25 import bm25_search

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    stages = {"untrained": args.model}
    for spec in args.stage:
        name, _, path = spec.partition("=")
        if not path or name in stages:
            raise SystemExit(f"--stage {spec!r}: expected a new NAME=MODEL_DIR")
        stages[name] = path
    work = Path(args.work)
    started = time.perf_counter()
    splits = {}
    for role, split in (("dev", args.dev_split), ("test", args.test_split)):
        data = load_dataset(args.data, split)
        query_ids = list(data.judged_queries)
        if role == "test" and args.queries:
            query_ids = query_ids[: args.queries]
        data.qrels = {q: data.qrels[q] for q in query_ids}
        bm25 = bm25_search(data, k=args.top_k, query_ids=query_ids, show_progress=False)
        splits[role] = (data, bm25, candidate_pairs(data, bm25, args.top_k, query_ids))
        print(f"{role} ({split}): {len(query_ids)} queries x BM25 top {args.top_k} = {len(splits[role][2])} pairs",
              flush=True)
    tag = f"q{args.queries or 'all'}-k{args.top_k}"
    scores, layers = {}, None
    for name, source in stages.items():
        reranker = None
        for role, (data, _, pairs) in splits.items():
            path = work / f"{name}-{role}-{tag}.pt"
            if not path.is_file() and reranker is None:
                reranker = load_stage(name, source, args)
            print(f"{name} on {role}:", flush=True)
            result = cached(path, lambda: {"layers": reranker.layers, "scores": layer_scores(reranker, data, pairs, args)})
            if layers is not None and result["layers"] != layers:
                raise SystemExit(f"{name} scores layers {result['layers']}, the others {layers}")
            layers = result["layers"]
            scores[(name, role)] = result["scores"]
    choice = choose_threshold(splits, scores, layers, list(stages)[-1])
    last = list(stages)[-1]
    # the measured adaptive pass runs at the chosen threshold: a new choice is a new measurement
    timing_path = work / f"timing-{last}-{tag}-p{args.timing_pairs}-r{args.timing_repeats}-t{choice['threshold']:g}.pt"
    timing = cached(timing_path, lambda: time_exits(load_and_calibrate(last, stages[last], args, choice), splits["test"][0],
                                                    splits["test"][2][: args.timing_pairs], args, choice["threshold"]))
    write_report(Path(args.out), args, stages, splits, scores, layers, timing, choice)
    print(f"total {time.perf_counter() - started:.0f} s; wrote {args.out}/table.md, results.json, layers.png")


def load_and_calibrate(name: str, source: str, args, choice: dict):
    reranker = load_stage(name, source, args)
    reranker.config.calibration = choice["calibration"]
    return reranker


if __name__ == "__main__":
    main()
