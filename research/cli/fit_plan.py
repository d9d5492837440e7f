"""What a ``research fit`` run will do, said in one block before it starts: run directory, model, data and split sizes,
stages (test before / fit N epochs or steps / test after), batch sizes, precision and devices."""

from __future__ import annotations

from pathlib import Path
from typing import Any

LARGE_CORPUS_BYTES = 500 * 1024 * 1024  # above this, the corpus is described by its size: counting would be a wait


def _get(tree: Any, *keys: str) -> Any:
    for key in keys:
        if tree is None:
            return None
        tree = tree.get(key) if hasattr(tree, "get") else getattr(tree, key, None)
    return tree


def _class_name(spec: Any) -> str:
    return str(_get(spec, "class_path") or type(spec).__name__)


def split_sizes(data: str, splits: list[str]) -> str:
    """``scifact (5,183 documents); train 809 queries, test 300 queries`` from the dataset's files, or just the name
    when it is not a BEIR folder (its DataModule reports the real problem when it loads it)."""
    from research.data.beir import resolve_dataset
    from research.data.trec import read_tsv_qrels
    from research.errors import ResearchError

    try:
        path = resolve_dataset(data, download=False)
    except ResearchError:
        return str(data)
    corpus = path / "corpus.jsonl"
    text = f"{data}"
    if corpus.is_file():
        if corpus.stat().st_size > LARGE_CORPUS_BYTES:
            text += f" ({corpus.stat().st_size / 2**30:.1f} GB corpus)"
        else:
            with open(corpus, "rb") as handle:
                text += f" ({sum(1 for line in handle if line.strip()):,} documents)"
    sizes = []
    for split in splits:
        qrels = path / "qrels" / f"{split}.tsv"
        if qrels.is_file():
            try:
                sizes.append(f"{split} {len(read_tsv_qrels(qrels)):,} queries")
            except ResearchError:
                sizes.append(f"{split} (unreadable qrels: the DataModule will say why)")
        else:
            sizes.append(f"{split} (no {qrels.relative_to(path)})")
    return text + ("; " + ", ".join(sizes) if sizes else "")


def _fit_length(trainer: Any) -> str:
    steps, epochs = trainer.max_steps, trainer.max_epochs
    parts = []
    if epochs is not None and epochs > 0:
        parts.append(f"{epochs} epoch{'s' if epochs != 1 else ''}")
    if steps is not None and steps > 0:
        parts.append(f"{steps} step{'s' if steps != 1 else ''}")
    if not parts:
        return "fit without an epoch or step limit"
    return "fit " + " or ".join(parts) + (" (whichever comes first)" if len(parts) > 1 else "")


def describe_fit(config: Any, run_dir: str | Path, trainer: Any, datamodule: Any) -> str:
    """The block ``research fit`` prints before it starts (``config``: the parsed ``fit`` namespace)."""
    model, data = _get(config, "model"), _get(config, "data")
    init = _get(model, "init_args")
    backbone = _get(init, "model")
    loss = _get(init, "loss")
    model_text = _class_name(model) + (f": {backbone}" if backbone else "")
    if loss is not None:
        model_text += f", loss {_class_name(loss)}"
    hparams = getattr(datamodule, "hparams", {}) or {}
    train_split, eval_split = hparams.get("train_split"), hparams.get("eval_split")
    splits = [s for s in dict.fromkeys((train_split, eval_split)) if s]
    data_text = _class_name(data)
    if hparams.get("data"):
        data_text += ": " + split_sizes(str(hparams["data"]), splits)
    stages = []
    test = f"test on '{eval_split}'" if eval_split else "test"
    if _get(config, "evaluate_before_fit"):
        stages.append(f"{test} before fit")
    ckpt = _get(config, "ckpt_path")
    stages.append(_fit_length(trainer) + (f", resumed from {ckpt}" if ckpt else ""))
    if _get(config, "save_model"):
        stages.append("save model/")
    if _get(config, "test_after_fit"):
        stages.append(f"{test} after fit")
    batch = hparams.get("batch_size")
    batches = (f"{batch} per step" if batch is not None else "the DataModule's") + (
        f" (eval {hparams['eval_batch_size']})" if hparams.get("eval_batch_size") is not None else "")
    if trainer.accumulate_grad_batches != 1:
        batches += f", {trainer.accumulate_grad_batches} accumulated per optimizer step"
    devices = f"{trainer.num_devices} {type(trainer.accelerator).__name__.removesuffix('Accelerator').lower()} device"
    precision = f"{trainer.precision} on {devices}{'s' if trainer.num_devices != 1 else ''}" + (
        f" x {trainer.num_nodes} nodes" if trainer.num_nodes > 1 else "") + _emulated_bf16(trainer)
    rows = [("run dir", str(run_dir)), ("model", model_text), ("data", data_text), ("stages", " -> ".join(stages)),
            ("batches", batches), ("precision", precision)]
    return "research fit: what this run will do\n" + "\n".join(f"  {name:<10} {value}" for name, value in rows)


def _emulated_bf16(trainer: Any) -> str:
    """A warning for bf16 autocast on a CPU that has no bfloat16 instructions (no AVX512-BF16 / AMX): there torch
    emulates it, and the run is far slower than under 32-true."""
    from research.models.runtime import preferred_dtype

    if "bf16" not in str(trainer.precision) or type(trainer.accelerator).__name__ != "CPUAccelerator":
        return ""
    import torch

    if preferred_dtype("cpu") == torch.bfloat16:
        return ""
    return " (this CPU has no native bfloat16, so autocast emulates it: far slower than --trainer.precision 32-true)"
