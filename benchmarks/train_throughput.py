"""Training throughput of the bi-encoder main-job configuration against a raw PyTorch loop and sentence-transformers.

Same model (all-MiniLM-L6-v2), data (SciFact train query/positive pairs), batch size, max lengths (query 64,
document 256), precision (bf16 autocast on CPU), optimiser (AdamW, constant lr) and number of steps. Each variant
runs in a fresh subprocess; the first ``--warmup`` steps are excluded from the timing. The ``*-fast-dropout`` variants
keep every dropout rate but draw the masks cheaply (:mod:`research.models.fast_dropout`): on this CPU the attention
dropout's ``bernoulli_`` was 38 % of a training step.

Speed options, each measured against ``framework-fast-dropout`` (pick variants with ``--variants``):
``framework-fast-dropout-bucketed`` (``length_bucketing: true``: batches of similar length, less padding),
``framework-fast-dropout-compile`` (``torch_compile: true``; its first step, which compiles, is reported apart) and
``tokenize`` (the bi-encoder's tokenisation per step, first time and from its tokenise-once cache). Framework
variants count the non-pad and padded tokens of their own timed batches.

    python benchmarks/train_throughput.py --steps 12 --warmup 2 --batch-size 32 --repeats 3
    python benchmarks/train_throughput.py --variants framework-fast-dropout framework-fast-dropout-bucketed \
        --data msmarco-dl19-subset --split test
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import emit, run_variant, table  # noqa: E402

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
QUERY_LEN, DOC_LEN, SCALE, LR = 64, 256, 20.0, 2e-5


def training_pairs(data: str, n: int, seed: int, split: str = "train") -> list[tuple[str, str]]:
    """The first ``n`` (query, positive) pairs in the order the framework's sampler yields them (epoch 0)."""
    from datamodules.retrieval import EpochShuffleSampler, GroupDataset
    from research.data.beir import load_dataset
    from research.data.groups import groups_from_qrels

    dataset = load_dataset(data, split)
    groups = GroupDataset(dataset, groups_from_qrels(dataset.qrels), num_negatives=0, seed=seed)
    order = [index for _, index in EpochShuffleSampler(len(groups), seed)][:n]
    return [(dataset.queries[groups.items[i][0]], dataset.corpus[groups.items[i][1]].full_text) for i in order]


def bench_raw(args, fast_dropout: bool = False) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    from research.models.bi_encoder import load_backbone
    from research.models.pretrained import resolve_model

    path = resolve_model(MODEL)
    model, tokenizer = load_backbone(path), AutoTokenizer.from_pretrained(path)
    model.train()
    if fast_dropout:  # the same dropout rates with cheap masks (research.models.fast_dropout)
        from research.models.fast_dropout import use_fast_dropout

        use_fast_dropout(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    pairs = training_pairs(args.data, args.steps * args.batch_size, args.seed, args.split)

    def embed(texts, max_length):
        inputs = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        hidden = model(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    start = None
    for step in range(args.steps):
        if step == args.warmup:
            start = time.perf_counter()
        batch = pairs[step * args.batch_size:(step + 1) * args.batch_size]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            scores = embed([q for q, _ in batch], QUERY_LEN) @ embed([d for _, d in batch], DOC_LEN).T * SCALE
        loss = F.cross_entropy(scores.float(), torch.arange(len(batch)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"seconds": time.perf_counter() - start, "timed_steps": args.steps - args.warmup}


def bench_framework(args, fast_dropout: bool = False, length_bucketing: bool = False, torch_compile: bool = False) -> dict:
    import lightning as L

    from datamodules.retrieval import RetrievalDataModule
    from modules.bi_encoder import BiEncoderModule

    class StepTimer(L.Callback):
        start = end = first_step = None

        def __init__(self) -> None:
            self.timed_batches = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == args.warmup and self.start is None:
                self.start = time.perf_counter()
            if trainer.global_step == 0:
                self.first_step = time.perf_counter()
            if trainer.global_step >= args.warmup:  # their tokens are counted after the timing
                self.timed_batches.append(batch)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step == 1:
                self.first_step = time.perf_counter() - self.first_step

        def on_train_end(self, trainer, module):
            self.end = time.perf_counter()

    module = BiEncoderModule(model=MODEL, lr=LR, warmup_ratio=0.0, query_max_length=QUERY_LEN, document_max_length=DOC_LEN,
                             temperature=1 / SCALE, fast_dropout=fast_dropout, torch_compile=torch_compile)
    data = RetrievalDataModule(args.data, train_split=args.split, eval_split=None, batch_size=args.batch_size,
                               seed=args.seed, length_bucketing=length_bucketing)
    timer = StepTimer()
    trainer = L.Trainer(max_steps=args.steps, precision="bf16-mixed", accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, callbacks=[timer], limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    tokens = padded = 0  # non-pad and padded tokens of the timed batches
    for batch in timer.timed_batches:
        for texts, is_query in ((batch.queries, True), ([d for g in batch.documents for d in g], False)):
            mask = module.encoder.tokenize(texts, is_query)["attention_mask"]
            tokens, padded = tokens + int(mask.sum()), padded + mask.numel()
    timed_pairs = (args.steps - args.warmup) * args.batch_size
    return {"seconds": timer.end - timer.start, "timed_steps": args.steps - args.warmup, "first_step_s": timer.first_step,
            "tokens_per_pair": tokens / timed_pairs, "padded_tokens_per_pair": padded / timed_pairs}


def bench_tokenize(args) -> dict:
    """Seconds per step spent tokenising a batch's queries and documents: the first time, then from the cache."""
    from research.models.bi_encoder import BiEncoder
    from research.models.pretrained import resolve_model

    encoder = BiEncoder.from_pretrained(resolve_model(MODEL), query_max_length=QUERY_LEN, document_max_length=DOC_LEN)
    pairs = training_pairs(args.data, args.steps * args.batch_size, args.seed, args.split)
    batches = [pairs[s:s + args.batch_size] for s in range(0, len(pairs), args.batch_size)]

    def epoch() -> float:
        start = time.perf_counter()
        for batch in batches:
            encoder.tokenize([q for q, _ in batch], is_query=True)
            encoder.tokenize([d for _, d in batch], is_query=False)
        return (time.perf_counter() - start) / len(batches)

    first = epoch()
    return {"seconds": epoch() * len(batches), "timed_steps": len(batches), "first_time_s_per_step": first}


def bench_sentence_transformers(args) -> dict:
    import tempfile

    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import (
        MultipleNegativesRankingLoss,
    )
    from transformers import TrainerCallback

    from research.models.pretrained import resolve_model

    class StepTimer(TrainerCallback):
        start = end = None

        def on_step_begin(self, targs, state, control, **kwargs):
            if state.global_step == args.warmup and self.start is None:
                self.start = time.perf_counter()

        def on_train_end(self, targs, state, control, **kwargs):
            self.end = time.perf_counter()

    model = SentenceTransformer(str(resolve_model(MODEL)), device="cpu")
    model.max_seq_length = DOC_LEN
    pairs = training_pairs(args.data, args.steps * args.batch_size, args.seed, args.split)
    dataset = Dataset.from_dict({"anchor": [q for q, _ in pairs], "positive": [d for _, d in pairs]})
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        targs = SentenceTransformerTrainingArguments(
            output_dir=tmp, per_device_train_batch_size=args.batch_size, max_steps=args.steps, learning_rate=LR,
            warmup_steps=0, lr_scheduler_type="constant", bf16=True, use_cpu=True, logging_steps=10_000,
            save_strategy="no", report_to="none", dataloader_drop_last=True, seed=args.seed, disable_tqdm=True,
        )
        trainer = SentenceTransformerTrainer(model=model, args=targs, train_dataset=dataset,
                                             loss=MultipleNegativesRankingLoss(model, scale=SCALE), callbacks=[timer])
        trainer.train()
    return {"seconds": timer.end - timer.start, "timed_steps": args.steps - args.warmup}


VARIANTS = {"raw": bench_raw, "raw-fast-dropout": partial(bench_raw, fast_dropout=True), "framework": bench_framework,
            "framework-fast-dropout": partial(bench_framework, fast_dropout=True),
            "sentence-transformers": bench_sentence_transformers,
            "framework-fast-dropout-bucketed": partial(bench_framework, fast_dropout=True, length_bucketing=True),
            "framework-fast-dropout-compile": partial(bench_framework, fast_dropout=True, torch_compile=True),
            "tokenize": bench_tokenize}
CORE = ["raw", "raw-fast-dropout", "framework", "framework-fast-dropout", "sentence-transformers"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=list(VARIANTS), help="run one variant in this process (used internally)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=CORE, help="the variants to compare")
    parser.add_argument("--data", default="scifact")
    parser.add_argument("--split", default="train", help="qrels split whose (query, positive) pairs are trained on")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds over all variants (interleaved, so a disturbance hits one round); median per variant")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.variant:
        emit(VARIANTS[args.variant](args))
        return
    passthrough = ["--data", args.data, "--split", args.split, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--threads", str(args.threads)]
    tokens = mean_tokens_per_pair(args)
    results = {name: [] for name in args.variants}
    for _ in range(args.repeats):
        for name in args.variants:
            results[name].append(run_variant(__file__, name, passthrough))
    rows = {}
    for name, runs in results.items():
        seconds = [r["seconds"] / r["timed_steps"] for r in runs]
        step = statistics.median(seconds)
        pairs_per_s = args.batch_size / step
        own_tokens = runs[0].get("tokens_per_pair", tokens)  # framework variants count their own batches' tokens
        rows[name] = {"variant": name, "pairs/s": pairs_per_s, "tokens/s": pairs_per_s * own_tokens, "s/step": step,
                      "s/step per round": " ".join(f"{s:.3f}" for s in seconds),
                      "tokens/pair": own_tokens, "padded tokens/pair": runs[0].get("padded_tokens_per_pair"),
                      "first step s": statistics.median(r["first_step_s"] for r in runs) if "first_step_s" in runs[0] else None,
                      "CPU steal % per round": " ".join("?" if r["steal_pct"] is None else f"{r['steal_pct']:.0f}" for r in runs),
                      "peak RSS MiB": max(r["peak_rss_mb"] for r in runs)}
    print(f"data {args.data} ({args.split}), steps {args.steps} (timed {args.steps - args.warmup}), batch {args.batch_size}, "
          f"bf16 autocast, max length q{QUERY_LEN}/d{DOC_LEN}, {tokens:.0f} non-pad tokens per pair in sampler order, "
          f"threads {args.threads}")
    print(f"{args.repeats} interleaved round(s); pairs/s from the median s/step")
    tokenize = rows.pop("tokenize", None)
    print(table(list(rows.values()), ["variant", "pairs/s", "tokens/s", "s/step", "s/step per round", "tokens/pair",
                                      "padded tokens/pair", "first step s", "CPU steal % per round", "peak RSS MiB"]))

    def ratio(line: str, a: str, b: str, overhead: bool = False, target: str = "") -> None:
        if a in rows and b in rows:
            value = rows[b]["pairs/s"] / rows[a]["pairs/s"]
            shown = f"{100 * (value - 1):+.1f} %" if overhead else f"{value:.2f}x"
            print(f"{line}: {shown}{f'  (target {target})' if target else ''}")

    ratio("framework overhead over raw loop", "framework", "raw", overhead=True, target="<= 5 %")
    ratio("framework / sentence-transformers throughput", "sentence-transformers", "framework", target=">= 1.2x")
    ratio("framework-fast-dropout overhead over the raw loop with fast dropout", "framework-fast-dropout",
          "raw-fast-dropout", overhead=True, target="<= 5 %")
    ratio("framework-fast-dropout / sentence-transformers throughput", "sentence-transformers", "framework-fast-dropout",
          target=">= 1.2x")
    ratio("length bucketing: bucketed / plain (fast dropout) pairs/s", "framework-fast-dropout", "framework-fast-dropout-bucketed")
    ratio("torch.compile: compiled / plain (fast dropout) pairs/s after the first steps", "framework-fast-dropout",
          "framework-fast-dropout-compile")
    if tokenize is not None:
        cached = tokenize["s/step"]
        first = statistics.median(r["first_time_s_per_step"] for r in results["tokenize"])
        share = f" = {100 * first / rows['framework-fast-dropout']['s/step']:.2f} % of a fast-dropout step" \
            if "framework-fast-dropout" in rows else ""
        print(f"tokenisation per step: first time {1000 * first:.1f} ms{share}; from the tokenise-once cache "
              f"{1000 * cached:.1f} ms ({first / cached:.1f}x less)")


def mean_tokens_per_pair(args) -> float:
    from transformers import AutoTokenizer

    from research.models.pretrained import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(MODEL))
    pairs = training_pairs(args.data, args.steps * args.batch_size, args.seed, args.split)
    q = tokenizer([p[0] for p in pairs], truncation=True, max_length=QUERY_LEN)["input_ids"]
    d = tokenizer([p[1] for p in pairs], truncation=True, max_length=DOC_LEN)["input_ids"]
    return sum(len(a) + len(b) for a, b in zip(q, d)) / len(pairs)


if __name__ == "__main__":
    main()
