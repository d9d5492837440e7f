"""Short, deterministic names of sweep configurations: run ids, labels, and the short forms of keys and values."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

BUNDLE_NAME = "name"  # the label key of a bundle (not a config key)


def short_key(key: str) -> str:
    """``model.init_args.loss.class_path`` -> ``loss``; ``trainer.max_steps`` -> ``max_steps``."""
    parts = [p for p in key.split(".") if p not in ("init_args", "class_path", "model", "data", "trainer")]
    return parts[-1] if parts else key.split(".")[-1]


def short_value(value: Any) -> str:
    """``research.losses.InfoNCE`` -> ``InfoNCE``; floats in short form; a bundle by its own short values."""
    if isinstance(value, dict):
        if BUNDLE_NAME in value:
            return str(value[BUNDLE_NAME])
        return "+".join(short_value(v) for v in value.values())
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    last = text.rsplit(".", 1)[-1]
    if "." in text and re.fullmatch(r"[A-Za-z_][\w.]*", text) and last[:1].isupper():
        return last
    return text


def config_label(params: dict[str, Any]) -> str:
    """A short, readable name of a configuration: ``InfoNCE`` for one parameter, ``loss=InfoNCE lr=1e-05`` for many."""
    if len(params) == 1:
        return short_value(next(iter(params.values())))
    return " ".join(f"{short_key(k)}={short_value(v)}" for k, v in params.items())


def run_id(params: dict[str, Any], seed: int, named: dict[str, Any] | None = None) -> str:
    """Deterministic run id: a readable slug (of ``named``, default all values), the seed and a hash of all values."""
    digest = hashlib.sha1(json.dumps({"params": params, "seed": seed}, sort_keys=True, default=str).encode()).hexdigest()
    slug = "_".join(short_value(v) for v in (params if named is None else named).values())
    slug = re.sub(r"[^A-Za-z0-9.=+-]+", "-", slug).strip("-")[:48] or "run"
    return f"{slug}-s{seed}-{digest[:8]}"
