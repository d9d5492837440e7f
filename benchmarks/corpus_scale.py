"""Corpus scale: sharded encoding throughput and per-rank memory on synthetic corpora, exact vs approximate search,
and an extrapolation to MS MARCO passage (8.8M); the figures of docs/scaling.md ("Corpus scale").

    python benchmarks/corpus_scale.py --part encode --sizes 100000,300000,1000000 --scaling-size 100000
    python benchmarks/corpus_scale.py --part ann --ann-size 1000000 --scifact-index DIR
    python benchmarks/corpus_scale.py --part all            # both, then the extrapolation table

encode: synthetic MS MARCO-like passages (random words, lognormal lengths of mean ~55 words) in a ``collection.tsv``
per size, indexed by ``research index`` with a tiny random BERT (so the large sizes finish on a CPU); every size once
with 1 rank (peak RSS per rank: flat once the corpus exceeds a shard) and ``--scaling-size`` with 1 and 2 ranks at
the same total thread count; MiniLM's per-passage rate on real MS MARCO passages (msmarco-dl19-subset) for the
extrapolation. ann: exact (shards merged) vs IVF-Flat vs HNSW32 on clustered synthetic embeddings (dim 384) and on
real SciFact MiniLM embeddings (an index made by ``research index``): build time, QPS, recall@100 of the approximate
top-100 against the exact one, size on disk. Each encoding run is a fresh process (its own peak RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, cpu_times, peak_rss_mb, steal_percent, table  # noqa: E402

WORDS = 5000  # synthetic vocabulary: every word one WordPiece token of the tiny model
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _words() -> list[str]:
    rng = np.random.default_rng(7)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    out: set[str] = set()
    while len(out) < WORDS:
        out.add("".join(rng.choice(letters, rng.integers(3, 10))))
    return sorted(out)


def write_collection(folder: Path, size: int, seed: int = 0) -> Path:
    """``folder/collection.tsv`` of ``size`` random-word passages (lognormal lengths, mean ~55 words, 5..200)."""
    path = folder / "collection.tsv"
    if path.is_file() and sum(1 for _ in open(path, "rb")) == size:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    words = np.array(_words())
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as out:
        for start in range(0, size, 50_000):
            n = min(50_000, size - start)
            lengths = np.clip(rng.lognormal(3.93, 0.38, n).astype(int), 5, 200)
            tokens = words[rng.integers(0, WORDS, int(lengths.sum()))]
            at = 0
            for i, length in enumerate(lengths):
                out.write(f"{start + i}\t{' '.join(tokens[at:at + length])}\n")
                at += length
    tmp.replace(path)
    return folder


def tiny_model(folder: Path) -> Path:
    """A random 2-layer BERT (hidden 32) over the synthetic vocabulary, max length 128."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(SPECIAL + _words()) + "\n")
    BertTokenizerFast.from_pretrained(str(folder), do_lower_case=True).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(SPECIAL) + WORDS, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=130)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128}))
    return folder


# ---------------------------------------------------------------- encoding runs (each a fresh process, per rank)
def worker(args: argparse.Namespace) -> None:
    """Run ``research index`` in this process (Lightning re-runs this script for the other ranks); each rank writes
    ``OUT.rank<R>.json``: texts encoded, seconds, peak RSS (files, not stdout: two ranks' lines would interleave)."""
    import torch

    from research.cli.main import main
    from research.training.index_writer import ShardWriter

    torch.set_num_threads(args.threads)
    seen: dict = {}
    original = ShardWriter.on_predict_end

    def record(self, trainer, module) -> None:
        original(self, trainer, module)
        seen.update(rank=trainer.global_rank, texts=self.texts, seconds=self.seconds)

    ShardWriter.on_predict_end = record
    code = main(["index", "--model", args.model, "--data", args.data, "--out", args.out, "--accelerator", "cpu",
                 "--devices", str(args.ranks), "--shard-size", str(args.shard_size), "--batch-size",
                 str(args.batch_size)])
    if code == 0:
        Path(f"{args.out}.rank{seen['rank']}.json").write_text(json.dumps({**seen, "peak_rss_mb": round(peak_rss_mb(), 1)}))
    sys.exit(code)


def run_index(model: Path, data: Path, out: Path, ranks: int, threads: int, shard_size: int, batch_size: int) -> dict:
    """One ``research index`` run with ``ranks`` processes of ``threads // ranks`` threads each."""
    per_rank = max(1, threads // ranks)
    env = {**os.environ, "OMP_NUM_THREADS": str(per_rank), "MKL_NUM_THREADS": str(per_rank), "WANDB_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo"}
    command = [sys.executable, __file__, "--worker", "--model", str(model), "--data", str(data), "--out", str(out),
               "--ranks", str(ranks), "--threads", str(per_rank), "--shard-size", str(shard_size),
               "--batch-size", str(batch_size)]
    before, started = cpu_times(), time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - started
    files = [Path(f"{out}.rank{r}.json") for r in range(ranks)]
    results = [json.loads(f.read_text()) for f in files if f.is_file()]
    if done.returncode != 0 or len(results) != ranks:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit(f"research index with {ranks} rank(s) failed (exit {done.returncode})")
    texts = sum(r["texts"] for r in results)
    seconds = max(r["seconds"] for r in results)
    return {"ranks": ranks, "threads/rank": per_rank, "texts": texts, "encode_s": round(seconds, 1),
            "texts/s": round(texts / seconds, 1), "wall_s": round(wall, 1),
            "peak_rss_mb/rank": max(r["peak_rss_mb"] for r in results), "steal%": steal_percent(before, cpu_times())}


def part_encode(args: argparse.Namespace, work: Path) -> dict:
    from research.data.beir import open_corpus

    model = tiny_model(work / "tiny-bert")
    rows, scaling = [], []
    for size in args.sizes:
        data = write_collection(work / f"synthetic-{size}", size)
        started = time.perf_counter()
        corpus = open_corpus(data / "collection.tsv")  # the one-time offset pass, outside the timed runs
        offsets_s = time.perf_counter() - started
        result = run_index(model, data, work / f"index-{size}-r1", 1, args.threads, args.shard_size, args.batch_size)
        rows.append({"passages": size, "offsets_build_s": round(offsets_s, 1), **result})
        print(table(rows[-1:], list(rows[-1])), flush=True)
        del corpus
    if args.scaling_size:
        data = write_collection(work / f"synthetic-{args.scaling_size}", args.scaling_size)
        for ranks in (1, 2):
            out = work / f"scaling-{args.scaling_size}-r{ranks}"
            scaling.append({"passages": args.scaling_size, **run_index(model, data, out, ranks, args.scaling_threads,
                                                                       args.shard_size, args.batch_size)})
            print(table(scaling[-1:], list(scaling[-1])), flush=True)
    minilm = None
    if args.minilm_passages:
        minilm = minilm_rate(work, args.minilm_passages, args.threads)
        print(table([minilm], list(minilm)), flush=True)
    return {"sizes": rows, "scaling": scaling, "minilm": minilm}


def minilm_rate(work: Path, count: int, threads: int) -> dict:
    """all-MiniLM-L6-v2 through ``research index`` on ``count`` real MS MARCO passages (msmarco-dl19-subset)."""
    from research.data.beir import load_corpus, resolve_dataset

    corpus = load_corpus(resolve_dataset("msmarco-dl19-subset") / "corpus.jsonl")
    folder = work / f"msmarco-real-{count}"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "collection.tsv", "w") as out:
        for pid, doc in list(corpus.items())[:count]:
            out.write(f"{pid}\t{' '.join(doc.full_text.split())}\n")
    result = run_index(Path("sentence-transformers/all-MiniLM-L6-v2"), folder, work / f"minilm-{count}", 1, threads,
                       10_000, 16)
    return {"model": "all-MiniLM-L6-v2", "passages": count, **result}


# ---------------------------------------------------------------- exact vs approximate search
def low_rank(n: int, dim: int, seed: int, basis: np.ndarray) -> np.ndarray:
    """Unit vectors of intrinsic dimension ``len(basis)``: a fixed random linear map of Gaussians plus small noise
    (text embeddings concentrate near a low-dimensional set; isotropic 384-d noise would be no test of an ANN index)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, len(basis))).astype(np.float32) @ basis
    x += 0.1 * rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def synthetic_index(folder: Path, n: int, dim: int = 384) -> tuple[Path, np.ndarray]:
    """A sharded index of ``n`` unit vectors (intrinsic dimension 48) and 1,000 queries near random documents."""
    from research.retrieval.index.manifest import IndexManifest
    from research.retrieval.index.shards import write_shard

    rng = np.random.default_rng(3)
    basis = rng.standard_normal((48, dim)).astype(np.float32) / np.sqrt(48)
    manifest = IndexManifest("synthetic", "synthetic", "mean", True, "", 256, "32-true", "float32", dim, n,
                             f"synthetic-{n}", 100_000, 16, "cpu")
    if not (folder / "manifest.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        manifest.write(folder)
        for shard in range(manifest.num_shards):
            start, rows = manifest.shard_rows(shard)
            write_shard(folder, manifest, shard, [f"v{i}" for i in range(start, start + rows)],
                        low_rank(rows, dim, 100 + shard, basis))
    picks = rng.integers(0, n, 1000)
    from research.retrieval.index.search import ShardedIndex

    base = ShardedIndex(folder).vectors(picks)
    queries = base + 0.3 * rng.standard_normal(base.shape).astype(np.float32) / np.sqrt(dim)
    return folder, queries / np.linalg.norm(queries, axis=1, keepdims=True)


def compare_searches(folder: Path, queries: np.ndarray, variants: list[tuple[str, dict]], label: str,
                     judged: tuple[list[str], dict] | None = None) -> list[dict]:
    """Exact top-100 and each variant's: build time, QPS, recall@100 against exact, size (and nDCG@10 with
    ``judged`` = (query ids, qrels))."""
    from research.eval.metrics import compute_metrics
    from research.retrieval.index.search import ShardedIndex, search_rows, to_run

    def ndcg(scores, rows) -> dict:
        if judged is None:
            return {}
        run = to_run(index, judged[0], scores, rows)
        return {"nDCG@10": round(compute_metrics(run, judged[1], ["nDCG@10"]).aggregate["nDCG@10"], 4)}

    index = ShardedIndex(folder)
    started = time.perf_counter()
    exact_scores, exact, _ = search_rows(index, queries, 100)
    exact_s = time.perf_counter() - started
    shard_bytes = sum((folder / "shards" / f"{s:06d}.npy").stat().st_size for s in range(index.manifest.num_shards))
    rows = [{"corpus": label, "index": "exact (shards merged)", "build_s": 0.0, "qps": round(len(queries) / exact_s, 1),
             "recall@100": 1.0, "disk_mb": round(shard_bytes / 2**20, 1), **ndcg(exact_scores, exact)}]
    print(table(rows, list(rows[0])), flush=True)
    for factory, params in variants:
        scores, rows_approx, info = search_rows(index, queries, 100, factory=factory, **params)
        recall = np.mean([len(set(a[a >= 0]) & set(e)) / 100 for a, e in zip(rows_approx, exact)])
        size = Path(info.path).stat().st_size
        name = factory + "".join(f" {k}={v}" for k, v in params.items())
        build = info.build_seconds if info.built else json.loads(Path(info.path).with_suffix(".json").read_text())["build_seconds"]
        rows.append({"corpus": label, "index": name, "build_s": round(build, 2),
                     "qps": round(len(queries) / info.search_seconds, 1), "recall@100": round(float(recall), 4),
                     "disk_mb": round(size / 2**20, 1), **ndcg(scores, rows_approx)})
        print(table(rows[-1:], list(rows[-1])), flush=True)
    return rows


def part_ann(args: argparse.Namespace, work: Path) -> dict:
    folder, queries = synthetic_index(work / f"ann-{args.ann_size}", args.ann_size)
    nlist = args.ann_lists
    synthetic = compare_searches(folder, queries, [
        (f"IVF{nlist},Flat", {"nprobe": 16}), (f"IVF{nlist},Flat", {"nprobe": 64}), ("HNSW32", {"efsearch": 128}),
    ], f"synthetic {args.ann_size:,} x 384")
    real = []
    if args.scifact_index:
        qids, queries, qrels = scifact_queries(Path(args.scifact_index))
        real = compare_searches(Path(args.scifact_index), queries, [
            ("IVF64,Flat", {"nprobe": 4}), ("IVF64,Flat", {"nprobe": 16}), ("HNSW32", {"efsearch": 128}),
        ], "SciFact MiniLM 5,183 x 384", judged=(qids, qrels))
    return {"synthetic": synthetic, "scifact": real}


def scifact_queries(index_dir: Path) -> tuple[list[str], np.ndarray, dict]:
    """The SciFact test queries encoded with the index's model (ids, embeddings, qrels)."""
    from research.data.beir import load_dataset
    from research.models.bi_encoder import BiEncoder
    from research.retrieval.index.manifest import read_manifest

    manifest = read_manifest(index_dir)
    encoder = BiEncoder.from_pretrained(manifest.model).eval()
    data = load_dataset("scifact", "test")
    qids = list(data.judged_queries)
    embeddings = encoder.encode_texts([data.queries[q] for q in qids], is_query=True, batch_size=64).numpy()
    return qids, embeddings, data.qrels


MSMARCO_PASSAGES, DEV_SMALL_QUERIES, DIM = 8_841_823, 6_980, 384


def extrapolate(figures: dict, gpu_rate: float, gpu_tflops: float) -> list[dict]:
    """MS MARCO passage encoding and dev.small exact search on 1, 4 and 8 GPUs (and this CPU) from the measured
    rates; ``gpu_rate`` (MiniLM passages/s per GPU) and ``gpu_tflops`` (sustained fp32 GEMM) are assumptions."""
    rows = []
    minilm = (figures.get("encode") or {}).get("minilm")
    exact = next((r for r in (figures.get("ann") or {}).get("synthetic", []) if r["index"].startswith("exact")), None)
    flops = 2.0 * DEV_SMALL_QUERIES * MSMARCO_PASSAGES * DIM
    if minilm and exact:
        products = exact["qps"] * int(figures["ann_size"])  # measured query x document products per second
        rows.append({"hardware": f"this CPU ({minilm['threads/rank']} threads)", "encode_h": round(
            MSMARCO_PASSAGES / minilm["texts/s"] / 3600, 1), "search_dev_small_s": round(
            DEV_SMALL_QUERIES * MSMARCO_PASSAGES / products, 1), "basis": "measured rates"})
    for gpus in (1, 4, 8):
        rows.append({"hardware": f"{gpus} GPU(s)", "encode_h": round(MSMARCO_PASSAGES / (gpu_rate * gpus) / 3600, 2),
                     "search_dev_small_s": round(flops / (gpu_tflops * 1e12 * gpus), 1),
                     "basis": f"assumed {gpu_rate:,.0f} passages/s and {gpu_tflops:g} TFLOP/s per GPU, linear in GPUs"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("encode", "ann", "all"), default="all")
    parser.add_argument("--work", default=None, help="folder for corpora and indexes (default: a temporary one)")
    parser.add_argument("--sizes", default="100000,300000,1000000", help="corpus sizes of the 1-rank runs")
    parser.add_argument("--scaling-size", type=int, default=100_000, help="corpus of the 1 vs 2 rank runs (0: none)")
    parser.add_argument("--threads", type=int, default=1, help="threads of the 1-rank size runs and MiniLM's")
    parser.add_argument("--scaling-threads", type=int, default=2, help="total threads of the 1 vs 2 rank runs")
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--minilm-passages", type=int, default=2000, help="real passages for MiniLM's rate (0: none)")
    parser.add_argument("--ann-size", type=int, default=1_000_000)
    parser.add_argument("--ann-lists", type=int, default=1024, help="IVF lists of the synthetic runs")
    parser.add_argument("--scifact-index", default=None, help="a research index of SciFact (MiniLM) for the real runs")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--gpu-rate", type=float, default=4000.0,
                        help="ASSUMED MiniLM passages/s per GPU for the extrapolation (gpu_check.sh measures it)")
    parser.add_argument("--gpu-tflops", type=float, default=15.0,
                        help="ASSUMED sustained fp32 GEMM TFLOP/s per GPU for the exact-search extrapolation")
    # worker mode (one research index run; Lightning re-runs it for rank 1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--model", "--data", "--out"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    parser.add_argument("--ranks", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="corpus-scale-"))
    os.environ.setdefault("RESEARCH_CACHE_DIR", str(work / "cache"))
    started = time.perf_counter()
    figures: dict = {}
    if args.part in ("encode", "all"):
        figures["encode"] = part_encode(args, work)
    if args.part in ("ann", "all"):
        figures["ann"] = part_ann(args, work)
    figures["ann_size"] = args.ann_size
    figures["extrapolation"] = extrapolate(figures, args.gpu_rate, args.gpu_tflops)
    figures["wall_s"] = round(time.perf_counter() - started, 1)
    print(table(figures["extrapolation"], ["hardware", "encode_h", "search_dev_small_s", "basis"]))
    print(json.dumps(figures, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
