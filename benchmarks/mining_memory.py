"""Peak memory and time of hard-negative mining against a large random corpus, for growing numbers of queries.

Each setting runs in a fresh subprocess (so peak RSS is its own): build an exact ``faiss.IndexFlatIP`` over a
random float32 corpus (default 1,000,000 x 384, added in blocks), then mine every query in query batches through
:func:`research.retrieval.mining.mine` (the code path of ``research mine``), writing the groups JSONL. Memory should be the
index plus one batch whatever the number of queries; a full query x corpus score matrix would need
``queries x docs x 4`` bytes (shown for comparison).

    OMP_NUM_THREADS=2 python benchmarks/mining_memory.py                       # 1M x 384, 1,000 vs 10,000 queries
    python benchmarks/mining_memory.py --docs 100000 --queries 100 1000       # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_mib() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(args: argparse.Namespace) -> dict:
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from research.retrieval.dense import DenseIndex
    from research.retrieval.mining import mine
    from research.retrieval.negatives import MiningConfig

    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    except ImportError:
        pass
    rng = np.random.default_rng(0)
    start_rss = rss_mib()

    def blocks():
        for start in range(0, args.docs, 100_000):
            n = min(100_000, args.docs - start)
            block = rng.standard_normal((n, args.dim), dtype=np.float32)
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            yield block

    started = time.perf_counter()
    index = DenseIndex(blocks(), [f"d{i}" for i in range(args.docs)])
    built = time.perf_counter()
    index_rss = rss_mib()
    query_ids = [f"q{i}" for i in range(args.queries)]
    positives = {q: [f"d{(7919 * i + j) % args.docs}" for j in range(1 + i % 3)] for i, q in enumerate(query_ids)}
    excluded = {q: frozenset(p) for q, p in positives.items()}
    qrng = np.random.default_rng(1)

    def batches():
        for start in range(0, args.queries, args.query_batch):
            ids = query_ids[start:start + args.query_batch]
            # each query near its positives, so that margins leave some negatives (as with a real retriever)
            anchors = np.stack([index.vectors[[index.position[d] for d in positives[q]]].mean(0) for q in ids])
            q = anchors + 0.08 * qrng.standard_normal((len(ids), args.dim), dtype=np.float32)
            yield ids, q / np.linalg.norm(q, axis=1, keepdims=True)

    sampled = {"max": rss_mib()}
    done = threading.Event()

    def sample() -> None:  # RSS while mining, every 20 ms (ru_maxrss also covers the index build)
        while not done.wait(0.02):
            sampled["max"] = max(sampled["max"], rss_mib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    config = MiningConfig(depth=args.depth, rank_min=10, rank_max=args.depth, relative_margin=0.05, num_negatives=20)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "groups.jsonl"
        stats = mine(index, batches(), positives, excluded, config, out=out)
        out_mib = out.stat().st_size / 2**20
    mined = time.perf_counter()
    done.set()
    sampler.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "queries": args.queries, "docs": args.docs, "dim": args.dim, "query_batch": args.query_batch,
        "start_rss_mib": round(start_rss), "index_rss_mib": round(index_rss), "mining_peak_rss_mib": round(sampled["max"]), "peak_rss_mib": round(peak),
        "index_s": round(built - started, 1), "mine_s": round(mined - built, 1),
        "queries_per_s": round(args.queries / max(mined - built, 1e-9), 1),
        "groups": stats.queries, "negatives": stats.kept, "output_mib": round(out_mib, 1),
        "full_matrix_gib": round(args.queries * args.docs * 4 / 2**30, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, nargs="+", default=[1_000, 10_000])
    parser.add_argument("--query-batch", type=int, default=1_000)
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.queries = args.queries[0]
        print(json.dumps(worker(args)))
        return
    rows = []
    for n in args.queries:
        cmd = [sys.executable, __file__, "--worker", "--docs", str(args.docs), "--dim", str(args.dim), "--queries", str(n),
               "--query-batch", str(args.query_batch), "--depth", str(args.depth), "--threads", str(args.threads)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"worker for {n} queries failed:\n{result.stderr}")
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\ncorpus {args.docs:,} x {args.dim} float32 (faiss IndexFlatIP), depth {args.depth}, "
          f"query batch {args.query_batch}, {args.threads} faiss threads")
    header = ("queries", "RSS after index MiB", "peak RSS while mining MiB", "peak RSS of process MiB", "index s", "mine s", "queries/s", "negatives", "full Q x N matrix GiB")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print(f"| {r['queries']:,} | {r['index_rss_mib']:,} | {r['mining_peak_rss_mib']:,} | {r['peak_rss_mib']:,} | {r['index_s']} | {r['mine_s']} | "
              f"{r['queries_per_s']} | {r['negatives']:,} | {r['full_matrix_gib']} |")


if __name__ == "__main__":
    main()
