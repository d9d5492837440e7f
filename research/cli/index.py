"""``research index`` (encode a corpus into shards, N ranks, resumable) and ``research search`` (search the shards).

    research index --model M --data D --out INDEX_DIR [--devices N] [--shard-size 10000] [--dtype float16]
    research search --index INDEX_DIR --data D --split S --out DIR [--index-factory IVF4096,Flat --nprobe 32] [--gpu]

The work is in :mod:`research.retrieval.index` (manifest, shards, search) and
:mod:`research.training.index_writer` (the prediction writer); docs/scaling.md ("Corpus scale") has the figures.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

from research.cli.options import add_precision, add_scoring, positive_int, scoring, wrote_evaluation
from research.errors import ResearchError


def _accelerator(name: str) -> str:
    import torch

    if name == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if name in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ResearchError(f"--accelerator {name}: no CUDA device is visible")
    return name


def cmd_index(args: argparse.Namespace) -> None:
    import lightning as L
    from torch.utils.data import DataLoader

    from modules.bi_encoder import BiEncoderModule
    from research.data.beir import load_dataset
    from research.retrieval.index.encode import ShardBatches, corpus_digest, prepare_directory
    from research.retrieval.index.manifest import IndexManifest, weights_digest
    from research.training.index_writer import ShardWriter

    warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")  # shards carry their own rows
    started = time.perf_counter()
    accelerator = _accelerator(args.accelerator)
    corpus = load_dataset(args.data, None, lazy_corpus=True).corpus  # offsets: no corpus dict on any rank
    module = BiEncoderModule(model=args.model, document_max_length=args.max_length, query_max_length=args.max_length,
                             trust_remote_code=args.trust_remote_code, cache_corpus_embeddings=False)
    encoder = module.encoder
    config = encoder.config
    manifest = IndexManifest(
        model=str(args.model), model_fingerprint=weights_digest(encoder, encoder.tokenizer), pooling=config.pooling,
        normalize=config.normalize, document_prefix=config.document_prefix, max_length=config.document_max_length,
        precision=args.precision, dtype=args.dtype, dim=encoder.dimension, count=len(corpus),
        corpus_digest=corpus_digest(corpus), shard_size=args.shard_size, batch_size=args.batch_size,
        device_type="cuda" if accelerator in ("gpu", "cuda") else accelerator, corpus_path=str(getattr(corpus, "path", "")))
    prepare_directory(args.out, manifest, f"--model {args.model} on --data {args.data}")  # every rank: same content
    dataset = ShardBatches(corpus, manifest, args.out, args.batch_size)
    writer = ShardWriter(dataset)
    processes = args.devices * args.num_nodes
    trainer = L.Trainer(accelerator=accelerator, devices=args.devices, num_nodes=args.num_nodes,
                        strategy="ddp" if processes > 1 else "auto", precision=args.precision, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                        use_distributed_sampler=False, callbacks=[writer])
    trainer.predict(module, dataloaders=DataLoader(dataset, batch_size=None), return_predictions=False)
    if trainer.global_rank != 0:
        return
    encoded = sum(manifest.shard_rows(s)[1] for s in dataset.missing)
    rate = f", {encoded / writer.seconds:.1f} texts/s over {trainer.world_size} rank(s)" if encoded and writer.seconds else ""
    print(f"wrote {args.out}: {manifest.count} documents in {manifest.num_shards} shards of {manifest.shard_size} "
          f"({len(dataset.missing)} encoded now, {manifest.num_shards - len(dataset.missing)} already there{rate}; "
          f"{time.perf_counter() - started:.0f} s)")


def _read_queries(path: str) -> dict[str, str]:
    from research.data.beir import load_queries
    from research.data.msmarco_files import read_queries

    return load_queries(path) if path.endswith(".jsonl") else read_queries(path, int_ids=False)


def _qrels(path: str):
    from research.data.trec import read_trec_qrels, read_tsv_qrels

    first = next((line for line in Path(path).read_text(encoding="utf-8-sig").splitlines() if line.strip()), "")
    return read_tsv_qrels(path) if len(first.split("\t")) == 3 else read_trec_qrels(path)


def cmd_search(args: argparse.Namespace) -> None:
    from research.data.beir import load_dataset
    from research.data.trec import write_run
    from research.eval.evaluation import RUN_FILE, evaluate_run, save_evaluation
    from research.models.bi_encoder import BiEncoder
    from research.models.runtime import inference_autocast, resolve_device
    from research.retrieval.dense import require_gpus
    from research.retrieval.index.encode import corpus_digest
    from research.retrieval.index.manifest import MANIFEST, weights_digest
    from research.retrieval.index.search import ShardedIndex, search_index

    started = time.perf_counter()
    if args.gpu:
        require_gpus()
    if args.data is None and args.queries is None:
        raise ResearchError("research search needs --data (its split's judged queries and qrels) or --queries FILE")
    index = ShardedIndex(args.index, verify=args.verify)
    manifest = index.manifest
    qrels = {}
    if args.data is not None:
        data = load_dataset(args.data, args.split, lazy_corpus=True)
        if corpus_digest(data.corpus) != manifest.corpus_digest:
            raise ResearchError(f"{Path(args.index) / MANIFEST}: the index holds another corpus than --data "
                                f"{args.data} ({manifest.count} documents from {manifest.corpus_path or 'elsewhere'})")
        queries, qrels = (data.judged_queries if args.queries is None else _read_queries(args.queries)), data.qrels
    else:
        queries = _read_queries(args.queries)
        qrels = _qrels(args.qrels) if args.qrels else {}
    model = args.model or manifest.model
    encoder = BiEncoder.from_pretrained(model, trust_remote_code=args.trust_remote_code, pooling=manifest.pooling,
                                        normalize=manifest.normalize, document_prefix=manifest.document_prefix,
                                        document_max_length=manifest.max_length, query_max_length=args.max_length)
    if weights_digest(encoder, encoder.tokenizer) != manifest.model_fingerprint:
        raise ResearchError(f"{Path(args.index) / MANIFEST}: the index was made with another model than {model} "
                            f"(weights or tokenizer differ); pass the model it was built with (--model)")
    device = resolve_device(args.device)
    encoder = encoder.to(device).eval()
    query_ids = list(queries)
    with inference_autocast(args.precision or manifest.precision, device):
        embeddings = encoder.encode_texts([queries[q] for q in query_ids], is_query=True, batch_size=args.batch_size)
    run, info = search_index(index, query_ids, embeddings.numpy(), k=args.top_k, factory=args.index_factory,
                             nprobe=args.nprobe, efsearch=args.efsearch, gpu=args.gpu, train_size=args.train_size)
    details = {"index": str(args.index), "model": str(model), "search": info.kind, "nprobe": args.nprobe,
               "efsearch": args.efsearch, "gpu": args.gpu, "queries": len(query_ids),
               "search_seconds": round(info.search_seconds, 3), "index_built_seconds": round(info.build_seconds, 3),
               "seconds": round(time.perf_counter() - started, 2)}
    built = f"; built {info.path} in {info.build_seconds:.1f} s" if info.built else (f"; reused {info.path}" if info.path else "")
    print(f"searched {len(index)} documents for {len(query_ids)} queries ({info.kind}{built}): "
          f"{len(query_ids) / max(info.search_seconds, 1e-9):.0f} queries/s")
    if not qrels:
        write_run(Path(args.out) / RUN_FILE, run, tag="dense")
        print(f"wrote {Path(args.out) / RUN_FILE} (no qrels: no metrics)")
        return
    evaluation = evaluate_run(run, qrels, **scoring(args))
    save_evaluation(args.out, evaluation, tag="dense", data=str(args.data), split=args.split, **scoring(args),
                    **details)
    print(f"{model} over {args.index}: " + "  ".join(f"{k} {v:.4f}" for k, v in evaluation.metrics.aggregate.items()))
    print(wrote_evaluation(args.out))


def register(sub) -> None:
    p = sub.add_parser("index", help="encode a corpus into shards (N ranks, resumable): an index directory",
                       description="Encode every document of --data with a bi-encoder into --out: shards of "
                                   "--shard-size embeddings (.npy, memory-mappable) and ids, and a manifest. With "
                                   "--devices N each of N ranks (DDP) encodes 1/N of the shards; a rerun resumes at "
                                   "the first missing shard.")
    p.set_defaults(func=cmd_index)
    p.add_argument("--model", required=True, help="model directory, packaged name or hub id")
    p.add_argument("--data", required=True, help="dataset folder or name under $RESEARCH_DATA_DIR (its corpus)")
    p.add_argument("--out", required=True, help="the index directory (created, or resumed when it has a manifest)")
    p.add_argument("--devices", type=positive_int, default=1, help="processes per node (DDP when > 1; default 1)")
    p.add_argument("--num-nodes", type=positive_int, default=1, help="nodes (default 1)")
    p.add_argument("--accelerator", default="auto", help="cpu, gpu or auto (default: gpu when visible)")
    add_precision(p, "encoding precision: ")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="stored embeddings (float16 halves the disk and page cache; default float32)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="texts per encoding batch (default 16)")
    p.add_argument("--shard-size", type=positive_int, default=10_000,
                   help="documents per shard: a rank's memory is one shard of texts and embeddings (default 10000)")
    p.add_argument("--max-length", type=positive_int, default=None, help="override the document max length in tokens")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model folder's own code")

    p = sub.add_parser("search", help="search an index directory: run.trec + metrics.json",
                       description="Encode queries with the index's model and search its shards: exactly (top-k "
                                   "merged over shards) or with a faiss index from --index-factory, trained on a "
                                   "sample and saved beside the shards. Writes OUT/run.trec, OUT/metrics.json and "
                                   "OUT/per_query.json.")
    p.set_defaults(func=cmd_search)
    p.add_argument("--index", required=True, help="an index directory made by research index")
    p.add_argument("--data", default=None, help="dataset folder or name: the split's judged queries and qrels")
    p.add_argument("--split", default="test", help="qrels split (default: test)")
    p.add_argument("--queries", default=None, help="queries from a file instead: qid<TAB>text lines, or BEIR .jsonl")
    p.add_argument("--qrels", default=None, help="qrels file for --queries without --data (TREC or BEIR .tsv)")
    p.add_argument("--out", required=True, help="output directory for run.trec, metrics.json and per_query.json")
    p.add_argument("--top-k", type=positive_int, default=100, help="documents retrieved per query (default 100)")
    p.add_argument("--index-factory", default=None, metavar="STR",
                   help="a faiss index factory string (IVF4096,Flat, IVF16384,PQ64, HNSW32); default: exact search")
    p.add_argument("--train-size", type=positive_int, default=None,
                   help="training sample of --index-factory (default: max(100000, 64 per IVF list), at most all)")
    p.add_argument("--nprobe", type=positive_int, default=None, help="IVF lists visited per query")
    p.add_argument("--efsearch", type=positive_int, default=None, help="HNSW search depth")
    p.add_argument("--gpu", action="store_true", help="search on all GPUs (needs faiss-gpu)")
    p.add_argument("--verify", action="store_true", help="check every shard's checksum before searching")
    p.add_argument("--model", default=None, help="the index's model, when its recorded name does not load here")
    p.add_argument("--batch-size", type=positive_int, default=64, help="queries per encoding batch (default 64)")
    p.add_argument("--max-length", type=positive_int, default=None, help="override the query max length in tokens")
    p.add_argument("--precision", choices=("32-true", "bf16-mixed"), default=None,
                   help="query encoding precision (default: the index's)")
    p.add_argument("--device", default="auto", help="query encoding device (default: cuda when visible)")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model folder's own code")
    add_scoring(p)
