"""Early-exit benchmark of the layer-wise LLM reranker: nDCG@10 and time per exit layer, before and after LoRA training.

One command, one table. Steps:

1. BM25 (bm25s, Lucene parameters) top-``k`` candidates for the first ``--queries`` judged queries of the test split
   (file order of queries.jsonl); BM25's own nDCG@10 over those candidates is the baseline row.
2. The untrained model (its layer heads start as the LM-head readout, i.e. zero-shot yes-vs-no log-odds) scores every
   candidate pair once, reading every exit layer in that pass.
3. LoRA training with Lightning (``LLMRerankerModule``: ListwiseSoftmaxCE on the last layer + self-distillation KL to the
   earlier layers) on SciFact train groups (``CandidateGroupsDataModule``: the positive + BM25 negatives from ranks
   ``--negative-ranks``), ``--steps`` steps of ``--batch-queries`` x ``--group-size`` documents.
4. The trained model scores the candidates again (one pass, every exit layer).
5. Time per 100 documents at each exit layer: ``score_pairs(exit_layer=l)`` (decoder blocks 1..l only) on the first
   ``--timing-pairs`` candidate pairs, best of ``--timing-repeats``; its scores are checked against the one-pass
   scores of that layer (max |difference| printed).

    python benchmarks/llm_exit_layers.py --data /work/shared/data/scifact --queries 50 --top-k 10 --steps 40
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


def autocast(precision: str, device: str):
    if precision == "bf16-mixed":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def evaluate_layers(reranker, data, pairs, layers, batch_size, precision, device):
    """nDCG@10 per layer of one scoring pass over ``pairs`` (every layer read in the same pass), and the scores."""
    from research.data.candidates import pairs_to_run
    from research.eval.evaluation import evaluate_run

    started = time.perf_counter()
    with autocast(precision, device):
        scores = reranker.score_layers([data.queries[p.query_id] for p in pairs],
                                       [data.corpus[p.doc_id].full_text for p in pairs], layers, batch_size)
    seconds = time.perf_counter() - started
    metrics = {layer: evaluate_run(pairs_to_run(pairs, scores[:, i].tolist()), data.qrels, ("nDCG@10",)).metrics.aggregate["nDCG@10"]
               for i, layer in enumerate(layers)}
    return metrics, scores, seconds


def time_exit_layers(reranker, data, pairs, layers, batch_size, repeats, precision, device, one_pass):
    """Seconds per 100 documents at each exit layer (best of ``repeats``), and max |early exit - one-pass score|."""
    queries = [data.queries[p.query_id] for p in pairs]
    documents = [data.corpus[p.doc_id].full_text for p in pairs]
    timings, differences = {}, {}
    for i, layer in enumerate(layers):
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            with autocast(precision, device):
                scores = reranker.score_pairs(queries, documents, batch_size=batch_size, exit_layer=layer)
            best = min(best, time.perf_counter() - started)
        timings[layer] = 100.0 * best / len(pairs)
        differences[layer] = float((scores - one_pass[: len(pairs), i]).abs().max())
    return timings, differences


def cached(path: Path, compute):
    """``compute()`` once: its result is kept in ``path`` (torch.save), so a re-run with the same ``--out`` resumes."""
    if path.is_file():
        return torch.load(path, weights_only=True)
    result = compute()
    torch.save(result, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--data", default="scifact", help="BEIR folder or name under $RESEARCH_DATA_DIR")
    parser.add_argument("--queries", type=int, default=50, help="first N judged test queries (0: all)")
    parser.add_argument("--top-k", type=int, default=10, help="BM25 candidates re-ranked per query")
    parser.add_argument("--start-layer", type=int, default=6)
    parser.add_argument("--layer-stride", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=192, help="prompt tokens in all (documents get the rest)")
    parser.add_argument("--query-max-length", type=int, default=48)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-queries", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--negative-ranks", type=int, nargs=2, default=(1, 30), metavar=("MIN", "MAX"))
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--head-lr", type=float, default=1e-3)
    parser.add_argument("--distill-weight", type=float, default=1.0)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (GPU, long inputs)")
    parser.add_argument("--precision", default=None, help="bf16-mixed or 32-true (default: bf16 where the hardware has it)")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per scoring batch")
    parser.add_argument("--timing-pairs", type=int, default=32)
    parser.add_argument("--timing-repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for results.json, the trained model and the logs")
    args = parser.parse_args()

    import lightning as L
    import transformers

    from datamodules.reranking import CandidateGroupsDataModule
    from modules.llm_reranker import LLMRerankerModule
    from research.data.beir import load_dataset
    from research.data.candidates import candidate_pairs
    from research.eval.evaluation import evaluate_run
    from research.models.llm_reranker import LayerwiseLLMReranker
    from research.models.runtime import preferred_dtype
    from research.retrieval.bm25 import bm25_search

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = args.precision or ("bf16-mixed" if preferred_dtype(device) == torch.bfloat16 else "32-true")
    out = Path(args.out or f"runs/llm_exit_layers/{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(args.seed, verbose=False)
    started = time.perf_counter()

    # 1. candidates and the BM25 baseline on the same queries
    test = load_dataset(args.data, "test")
    query_ids = list(test.judged_queries)[: args.queries or None]
    test.qrels = {q: test.qrels[q] for q in query_ids}
    bm25 = bm25_search(test, k=args.top_k, query_ids=query_ids, show_progress=False)
    pairs = candidate_pairs(test, bm25, args.top_k, query_ids)
    bm25_ndcg = evaluate_run(bm25, test.qrels, ("nDCG@10",)).metrics.aggregate["nDCG@10"]
    print(f"{len(query_ids)} test queries x BM25 top {args.top_k} = {len(pairs)} pairs; BM25 nDCG@10 {bm25_ndcg:.4f}; "
          f"precision {precision}; torch threads {torch.get_num_threads()}", flush=True)

    # 2. the untrained model
    common = dict(readout="heads", start_layer=args.start_layer, layer_stride=args.layer_stride,
                  max_length=args.max_length, query_max_length=args.query_max_length)

    def untrained_pass():
        untrained = LayerwiseLLMReranker.from_pretrained(args.model, **common).to(device).eval()
        return untrained.layers, *evaluate_layers(untrained, test, pairs, untrained.layers, args.batch_size, precision, device)

    layers, before, before_scores, seconds = cached(out / "untrained.pt", untrained_pass)
    print(f"untrained: one pass over {len(pairs)} pairs in {seconds:.0f} s; nDCG@10 "
          + " ".join(f"L{l} {v:.4f}" for l, v in before.items()), flush=True)

    # 3. LoRA training (checkpointed every 5 steps: a re-run with the same --out resumes)
    def train():
        from lightning.pytorch.callbacks import ModelCheckpoint

        module = LLMRerankerModule(model=args.model, lora_rank=args.lora_rank, lr=args.lr, head_lr=args.head_lr,
                                   distill_weight=args.distill_weight, gradient_checkpointing=args.gradient_checkpointing,
                                   warmup_ratio=0.1, **common)
        datamodule = CandidateGroupsDataModule(args.data, train_split="train", eval_split=None, group_size=args.group_size,
                                               negative_rank_min=args.negative_ranks[0],
                                               negative_rank_max=args.negative_ranks[1],
                                               batch_size=args.batch_queries, seed=args.seed)
        checkpoints = ModelCheckpoint(dirpath=out / "checkpoints", every_n_train_steps=5, save_last=True, save_top_k=0)
        trainer = L.Trainer(max_steps=args.steps, accelerator=device, devices=1, precision=precision,
                            logger=L.pytorch.loggers.CSVLogger(out, name="train", flush_logs_every_n_steps=1),
                            callbacks=[checkpoints], enable_model_summary=False, enable_progress_bar=False,
                            log_every_n_steps=1, limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=1.0)
        last = out / "checkpoints" / "last.ckpt"
        train_started = time.perf_counter()
        trainer.fit(module, datamodule=datamodule, ckpt_path=last if last.is_file() else None)
        module.save_pretrained(out / "model")
        return {"seconds_this_run": time.perf_counter() - train_started, "resumed": last.is_file(),
                "final_train_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}}

    training = cached(out / "training.pt", train)
    print(f"trained {args.steps} steps of {args.batch_queries}x{args.group_size}: " + " ".join(
        f"{k} {v:.3f}" for k, v in training["final_train_metrics"].items()), flush=True)
    trained = LayerwiseLLMReranker.from_pretrained(out / "model").to(device).eval()

    # 4. the trained model; 5. time per exit layer
    after, after_scores, seconds = cached(out / "trained.pt", lambda: evaluate_layers(
        trained, test, pairs, layers, args.batch_size, precision, device))
    print(f"trained: one pass over {len(pairs)} pairs in {seconds:.0f} s", flush=True)
    sample = pairs[: args.timing_pairs]
    timings, differences = time_exit_layers(trained, test, sample, layers, args.batch_size, args.timing_repeats,
                                            precision, device, after_scores)

    header = f"{'exit layer':>10} {'s / 100 docs':>12} {'nDCG@10 untrained':>17} {'nDCG@10 trained':>15}"
    lines = [header, "-" * len(header)]
    lines += [f"{l:>10} {timings[l]:>12.1f} {before[l]:>17.4f} {after[l]:>15.4f}" for l in layers]
    lines.append(f"{'BM25':>10} {'':>12} {bm25_ndcg:>17.4f} {bm25_ndcg:>15.4f}")
    table = "\n".join(lines)
    print(table)
    print("max |early exit - one-pass score| per layer: " + " ".join(f"L{l} {d:.1e}" for l, d in differences.items()))
    print(f"total {time.perf_counter() - started:.0f} s; results in {out}")
    (out / "table.txt").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({
        "args": vars(args), "precision": precision, "queries": query_ids, "pairs": len(pairs), "bm25_ndcg@10": bm25_ndcg,
        "untrained_ndcg@10": before, "trained_ndcg@10": after, "seconds_per_100_docs": timings,
        "max_abs_exit_vs_one_pass": differences, "training": training,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
