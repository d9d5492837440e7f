"""Re-ranking throughput (pairs/s) of the framework's cross-encoder against ``sentence_transformers.CrossEncoder.predict``.

Same model directory (a cross-encoder built from all-MiniLM-L6-v2 and saved once), the same (query, document) pairs
(BM25 top-k of SciFact test queries), max length 256, batch size 32. The framework scores in length-sorted batches,
in fp32 and in bf16 autocast; sentence-transformers predicts in fp32. Each variant runs in a fresh subprocess.

    python benchmarks/rerank_throughput.py --queries 50 --top-k 20
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import emit, run_variant, table  # noqa: E402

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def pairs(args) -> tuple[list[str], list[str]]:
    from research.data.beir import load_dataset
    from research.retrieval.bm25 import bm25_search

    data = load_dataset(args.data, "test")
    query_ids = list(data.judged_queries)[:args.queries]
    run = bm25_search(data, k=args.top_k, query_ids=query_ids, show_progress=False)
    flat = [(qid, doc) for qid in query_ids for doc in run[qid]]
    return [data.queries[q] for q, _ in flat], [data.corpus[d].full_text for _, d in flat]


def bench_framework(args, bf16: bool) -> dict:
    import torch

    from research.models.cross_encoder import CrossEncoder

    model = CrossEncoder.from_pretrained(args.model_dir)
    queries, documents = pairs(args)
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        scores = model.score(queries, documents, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "pairs": len(queries), "scores": scores.tolist()}


def bench_sentence_transformers(args) -> dict:
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(args.model_dir, device="cpu", max_length=256)
    queries, documents = pairs(args)
    start = time.perf_counter()
    scores = model.predict(list(zip(queries, documents)), batch_size=args.batch_size, activation_fn=None,
                           show_progress_bar=False, convert_to_numpy=True)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "pairs": len(queries), "scores": [float(s) for s in scores]}


VARIANTS = {
    "framework-fp32": lambda a: bench_framework(a, False),
    "framework-bf16": lambda a: bench_framework(a, True),
    "sentence-transformers-fp32": bench_sentence_transformers,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=list(VARIANTS))
    parser.add_argument("--model-dir")
    parser.add_argument("--data", default="scifact")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.variant:
        emit(VARIANTS[args.variant](args))
        return
    from research.models.cross_encoder import CrossEncoder

    with tempfile.TemporaryDirectory() as tmp:
        CrossEncoder.from_pretrained(MODEL).save_pretrained(tmp)  # the same untrained-head model for every variant
        passthrough = ["--model-dir", tmp, "--data", args.data, "--queries", str(args.queries), "--top-k", str(args.top_k),
                       "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
        rows = [{"variant": name, **run_variant(__file__, name, passthrough)} for name in VARIANTS]
    reference = torch.tensor(rows[-1]["scores"])
    for row in rows:
        row["pairs/s"] = row["pairs"] / row["seconds"]
        row["max |score diff| vs ST"] = float((torch.tensor(row["scores"]) - reference).abs().max())
    print(f"{rows[0]['pairs']} pairs ({args.queries} SciFact test queries x BM25 top-{args.top_k}), max length 256, "
          f"batch {args.batch_size}, threads {args.threads}")
    print(table(rows, ["variant", "pairs/s", "seconds", "peak_rss_mb", "steal_pct", "max |score diff| vs ST"]))
    for row in rows[:-1]:
        print(f"{row['variant']}: {row['pairs/s'] / rows[-1]['pairs/s']:.2f}x sentence-transformers' pairs/s")


if __name__ == "__main__":
    main()
