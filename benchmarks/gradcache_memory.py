"""GradCache vs plain backprop: peak memory (RSS) and time of one real MiniLM training step on CPU.

One BiEncoderModule step (all-MiniLM-L6-v2, InfoNCE with in-batch negatives, AdamW) at 256 queries + 256 documents
(query max length 64, document max length 128, every document at full length), either the plain loss (one forward
and backward over the whole batch) or GradCache with chunks of 32 texts (BiEncoderModule's own code path: the
module's chunk encoder and loss inside research.training.gradcache.GradCache). Each variant runs in a fresh subprocess, so
its peak resident set size (ru_maxrss) is its own: a warm-up step on 8 queries first creates AdamW's state, then
the baseline RSS is read and the measured step runs. "step extra" = peak - baseline, the memory the step needed on
top of model, optimizer state and inputs.

Run: python benchmarks/gradcache_memory.py [--batch 256 --chunk 32 --doc-length 128 --threads 1]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time


def rss_mb() -> float:
    """Current resident set size (MiB), from /proc."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def texts(rng: random.Random, words: list[str], count: int, length: int) -> list[str]:
    return [" ".join(rng.choice(words) for _ in range(length)) for _ in range(count)]


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from modules.bi_encoder import BiEncoderModule
    from research.data.batches import GroupBatch
    from research.training.gradcache import GradCache

    module = BiEncoderModule(model=args.model, query_max_length=args.query_length, document_max_length=args.doc_length).train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=2e-5)
    vocab = [w for w in module.encoder.tokenizer.get_vocab() if w.isalpha() and len(w) > 2]
    rng = random.Random(0)

    def make_batch(n: int) -> GroupBatch:
        queries = texts(rng, vocab, n, args.query_length // 2)
        docs = texts(rng, vocab, n, args.doc_length * 2)  # truncated: every document has doc_length tokens
        return GroupBatch(query_ids=[f"q{i}" for i in range(n)], queries=queries, doc_ids=[[f"d{i}"] for i in range(n)],
                          documents=[[d] for d in docs], targets=torch.ones(n, 1), positive_ids=[frozenset({f"d{i}"}) for i in range(n)])

    def step(batch: GroupBatch) -> float:
        optimizer.zero_grad(set_to_none=True)
        if args.variant == "plain":
            loss, _ = module._loss(batch, *module.embed(batch))
            loss.backward()
        else:
            q = module.encoder.tokenize(batch.queries, is_query=True)
            d = module.encoder.tokenize([t for g in batch.documents for t in g], is_query=False)
            loss = GradCache(args.chunk).step(
                [(lambda c: module._encode_chunk(c, True), q), (lambda c: module._encode_chunk(c, False), d)],
                lambda qe, de: module._loss(batch, qe, de)[0],
            )
        optimizer.step()
        return float(loss)

    step(make_batch(8))  # warm-up: AdamW state, allocator, kernels
    batch = make_batch(args.batch)
    module.encoder.tokenize(batch.queries, True), module.encoder.tokenize([g[0] for g in batch.documents], False)  # token cache
    optimizer.zero_grad(set_to_none=True)
    baseline = rss_mb()
    started = time.perf_counter()
    loss = step(batch)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"variant": args.variant, "baseline_mb": baseline, "peak_mb": peak, "seconds": seconds, "loss": loss}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--batch", type=int, default=256, help="queries per step (as many positive documents)")
    parser.add_argument("--chunk", type=int, default=32, help="GradCache chunk size (texts)")
    parser.add_argument("--query-length", type=int, default=64)
    parser.add_argument("--doc-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variant", choices=["plain", "gradcache"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        child(args)
        return
    print(f"all-MiniLM-L6-v2, one AdamW step, {args.batch} queries (<= {args.query_length} tokens) + {args.batch} documents "
          f"({args.doc_length} tokens), in-batch InfoNCE, CPU, {args.threads} thread(s)")
    rows = []
    for variant in ("plain", "gradcache"):
        command = [sys.executable, __file__, "--variant", variant] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "variant"]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{'variant':<16} {'baseline MiB':>12} {'peak MiB':>9} {'step extra MiB':>14} {'step s':>7} {'loss':>7}")
    for r in rows:
        name = "plain" if r["variant"] == "plain" else f"gradcache({args.chunk})"
        print(f"{name:<16} {r['baseline_mb']:>12.0f} {r['peak_mb']:>9.0f} {r['peak_mb'] - r['baseline_mb']:>14.0f} "
              f"{r['seconds']:>7.1f} {r['loss']:>7.4f}")
    plain, cached = rows
    print(f"GradCache step extra memory: {(cached['peak_mb'] - cached['baseline_mb']) / (plain['peak_mb'] - plain['baseline_mb']):.2f}x "
          f"of plain; time {cached['seconds'] / plain['seconds']:.2f}x (one extra forward pass without a graph)")


if __name__ == "__main__":
    main()
