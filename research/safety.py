"""Secrets out of every record, and loading that executes no code.

**Secrets.** API keys and tokens come from the environment (``WANDB_API_KEY``, an LLM judge's token, ``HF_TOKEN``)
and must never reach a saved config, ``run_info.json``, a checkpoint, a log or a W&B run. :func:`redact` replaces

* the value of every key whose name looks like a secret (``api_key``, ``token``, ``password``, ``secret``,
  ``authorization``, ``credentials``, ``private_key``, ...; a string value only, so ``max_tokens: 512`` stays), and
* every occurrence of the value of a secret-named environment variable (``WANDB_API_KEY=...`` anywhere in a string),

with ``***``. :func:`redact_argv` does the same for a command line (``--judge.api_key=...``, ``--token X``).

**Loading.** Checkpoints load through ``research.training.callbacks.AtomicCheckpointIO`` with
``torch.load(weights_only=True)``: tensors and plain containers only, no pickled code. Hugging Face weights load from safetensors (transformers reads ``*.bin`` with ``weights_only=True``),
and ``trust_remote_code`` is off unless a config turns it on: a model folder whose ``config.json`` maps classes to
its own code (``auto_map``) loads the built-in class of a known architecture, or is refused (one line from the CLI).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

REDACTED = "***"

# name parts (split on _ - . and camelCase) that make a key secret
_SECRET_PARTS = frozenset({
    "token", "secret", "secrets", "password", "passwd", "passphrase", "apikey", "authorization", "auth", "credential",
    "credentials", "cookie", "bearer", "signature",
})
# adjacent part pairs that make a key secret
_SECRET_PAIRS = frozenset({("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key"), ("client", "secret"),
                           ("session", "key"), ("hf", "token")})
# value shapes of well-known credentials, redacted wherever they appear
_SECRET_VALUE = re.compile(
    r"\b(?:sk-[A-Za-z0-9_\-]{16,}|hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|xox[abposr]-[A-Za-z0-9\-]{10,}"
    r"|AKIA[0-9A-Z]{16}|eyJ[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]{10,})"
)
_MIN_SECRET_LENGTH = 8  # shorter environment values ("1", "true", "offline") are not treated as secrets


def _name_parts(name: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(name))
    return [part for part in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if part]


def is_secret_key(name: str) -> bool:
    """Whether a config key / argument / environment variable name looks like it holds a secret.

    ``api_key``, ``OPENAI_API_KEY``, ``hf_token``, ``judge.authToken``, ``password``, ``client_secret``: yes.
    ``max_tokens``, ``tokenizer``, ``token_budget`` with a number: the name alone says yes for ``token_*``, but
    :func:`redact` only replaces string values, so counts and sizes stay.
    """
    parts = _name_parts(name)
    if any(part in _SECRET_PARTS for part in parts):
        return True
    return any(pair in _SECRET_PAIRS for pair in zip(parts, parts[1:]))


def secret_env_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of secret-named environment variables (``WANDB_API_KEY``, ``*_TOKEN``, ...), longest first."""
    environ = os.environ if environ is None else environ
    values = {value for name, value in environ.items()
              if is_secret_key(name) and isinstance(value, str) and len(value.strip()) >= _MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def redact_text(text: str, secrets: Iterable[str] | None = None) -> str:
    """``text`` with every known secret value (from the environment, or ``secrets``) and credential-shaped token
    (``sk-...``, ``hf_...``, ``ghp_...``, JWTs) replaced by ``***``."""
    for value in (secret_env_values() if secrets is None else secrets):
        text = text.replace(value, REDACTED)
    return _SECRET_VALUE.sub(REDACTED, text)


def redact(obj: Any, secrets: Iterable[str] | None = None, _key: str | None = None) -> Any:
    """A copy of ``obj`` (dicts, lists, tuples, strings, jsonargparse Namespaces) with secrets replaced by ``***``."""
    secrets = list(secret_env_values() if secrets is None else secrets)
    return _redact(obj, secrets, _key)


def _redact(obj: Any, secrets: list[str], key: str | None) -> Any:
    if isinstance(obj, str):
        if key is not None and is_secret_key(key) and obj:
            return REDACTED
        return redact_text(obj, secrets)
    if _is_namespace(obj):
        return type(obj)(**{k: _redact(v, secrets, k) for k, v in vars(obj).items()})
    if isinstance(obj, Mapping):
        return _rebuild_mapping(obj, {k: _redact(v, secrets, str(k)) for k, v in obj.items()})
    if isinstance(obj, list):
        return [_redact(v, secrets, key) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_redact(v, secrets, key) for v in obj)
    return obj


def _rebuild_mapping(original: Mapping, items: dict) -> Any:
    try:
        return type(original)(items)
    except TypeError:
        return items


def _is_namespace(obj: Any) -> bool:
    return type(obj).__name__ == "Namespace" and type(obj).__module__.startswith(("jsonargparse", "argparse"))


def redact_argv(argv: Iterable[str], secrets: Iterable[str] | None = None) -> list[str]:
    """A command line with the values of secret-named options (``--x.api_key=V``, ``--token V``, ``KEY=V``) and
    any secret environment value replaced by ``***``."""
    secrets = list(secret_env_values() if secrets is None else secrets)
    out: list[str] = []
    hide_next = False
    for arg in map(str, argv):
        if hide_next and not arg.startswith("--"):
            out.append(REDACTED)
            hide_next = False
            continue
        hide_next = False
        name, sep, value = arg.partition("=")
        if sep and is_secret_key(name.lstrip("-").rsplit(".", 1)[-1]) and value:
            out.append(f"{name}={REDACTED}")
            continue
        if arg.startswith("-") and not sep and is_secret_key(arg.lstrip("-").rsplit(".", 1)[-1]):
            hide_next = True
        out.append(redact_text(arg, secrets))
    return out


def find_secrets(obj: Any, path: str = "") -> list[str]:
    """Dotted paths of secret-named keys holding a non-empty string (what :func:`redact` would hide)."""
    found: list[str] = []
    items = vars(obj).items() if _is_namespace(obj) else obj.items() if isinstance(obj, Mapping) else None
    if items is not None:
        for key, value in items:
            where = f"{path}.{key}" if path else str(key)
            if isinstance(value, str) and value and value != REDACTED and is_secret_key(str(key)):
                found.append(where)
            else:
                found.extend(find_secrets(value, where))
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            found.extend(find_secrets(value, f"{path}[{index}]"))
    return found


# ---------------------------------------------------------------- safe loading
