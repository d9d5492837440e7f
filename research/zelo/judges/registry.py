"""The judge types by name: each one's spec-string form, parameters and builder, behind every spec parsed or built.

A spec is a short string, ``TYPE[:POSITIONAL...][:key=value...]`` (:func:`parse_judge_spec`), or a dict with
``type:`` (a YAML / JSON judges file, :func:`read_judge_specs`); :func:`build_judge` and :func:`build_ensemble`
turn spec dicts into judges. Every check of a type or a parameter name reads :data:`JUDGES`, so a new judge type
is one entry there, and an unknown type or parameter is one line naming the valid ones.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from research.errors import DataFormatError, ResearchError
from research.retrieval.bm25 import BM25Config
from research.zelo.judges.base import Ensemble, Judge
from research.zelo.judges.chat import ChatJudge
from research.zelo.judges.score import bm25_judge, model_judge

if TYPE_CHECKING:
    from research.data.beir import RetrievalDataset

COMMON = ("name", "weight")  # every judge has a name; weight is its share of the ensemble, not the judge's
_OPTION = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=[^:]*$")


@dataclass(frozen=True)
class JudgeType:
    """One kind of judge.

    ``fields`` are the spec string's positional parts after the type, in order; the first takes what is left of
    the string, so a URL or a path may contain ``:``. ``optional`` fields may be empty (then ``None``).
    ``parameters`` are every key a spec dict may set besides ``type`` and :data:`COMMON`.
    ``build(parameters, data, device)`` makes the judge; ``usage`` is what a malformed spec string is told.
    """

    fields: tuple[str, ...]
    optional: tuple[str, ...]
    parameters: tuple[str, ...]
    build: Callable[[dict[str, Any], RetrievalDataset | None, str], Judge]
    usage: str

    @property
    def valid(self) -> list[str]:
        return sorted({*self.parameters, *COMMON})


def _keywords(function: Callable, exclude: Sequence[str] = ()) -> tuple[str, ...]:
    """The keyword parameters of a builder: its signature is the one list of what a spec may set."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(p.name for p in inspect.signature(function).parameters.values()
                 if p.kind in kinds and p.name not in exclude)


def _build_bm25(parameters: dict[str, Any], data: RetrievalDataset | None, device: str) -> Judge:
    if data is None:
        raise ResearchError("a bm25 judge needs the dataset's corpus")
    return bm25_judge(data, **parameters)


def _build_model(parameters: dict[str, Any], data: RetrievalDataset | None, device: str) -> Judge:
    return model_judge(**{"device": device, **parameters})  # a spec's own device wins over the command's


def _build_llm(parameters: dict[str, Any], data: RetrievalDataset | None, device: str) -> Judge:
    return ChatJudge(**parameters)


JUDGES: dict[str, JudgeType] = {
    "bm25": JudgeType(
        fields=(), optional=(),
        parameters=(*_keywords(bm25_judge, exclude=("data",)), *(f.name for f in dataclasses.fields(BM25Config))),
        build=_build_bm25, usage="bm25 takes options only (bm25:temperature=1.0)"),
    "model": JudgeType(
        fields=("path",), optional=(), parameters=_keywords(model_judge), build=_build_model,
        usage="expected model:DIR[:temperature=T]"),
    "llm": JudgeType(
        fields=("base_url", "model", "api_key_env"), optional=("api_key_env",),
        parameters=_keywords(ChatJudge, exclude=("sleep",)),  # sleep is a test hook, not a setting
        build=_build_llm, usage="expected llm:URL:MODEL:KEY_ENV (KEY_ENV may be empty)"),
}
JUDGE_TYPES = tuple(JUDGES)


def judge_type(kind: Any, where: str = "") -> JudgeType:
    """The registry entry of ``kind``; an unknown one is a :class:`ResearchError` listing the valid types."""
    if kind not in JUDGES:
        raise ResearchError(f"{where}unknown judge type {kind!r} (choose from {', '.join(JUDGE_TYPES)})")
    return JUDGES[kind]


def check_spec(spec: Mapping[str, Any], where: str = "") -> None:
    """Raise a one-line :class:`ResearchError` unless ``spec`` names a known type, known parameters and its fields."""
    kind = spec.get("type")
    entry = judge_type(kind, where)
    if "api_key" in spec:
        raise ResearchError(f"{where}put the API key in an environment variable and name it with api_key_env, "
                            f"never in a file")
    for key in spec:
        if key != "type" and key not in entry.parameters and key not in COMMON:
            raise ResearchError(f"{where}unknown parameter {key!r} for judge {kind!r} "
                                f"(valid: {', '.join(entry.valid)})")
    missing = [f for f in entry.fields if f not in entry.optional and not spec.get(f)]
    if missing:
        raise ResearchError(f"{where}judge {kind!r} needs {', '.join(missing)}")


def _coerce(value: str) -> Any:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(value.lower(), value)


def parse_judge_spec(spec: str) -> dict[str, Any]:
    """A judge spec string as a dict: ``TYPE[:POSITIONAL...][:key=value...]``.

    - ``bm25[:temperature=1.0]``
    - ``model:DIR[:temperature=0.1][:batch_size=32][:device=cuda][:max_length=256]`` (any scorer directory)
    - ``llm:URL:MODEL:KEY_ENV[:timeout=30][:retries=5][:logprobs=true]...`` (``KEY_ENV`` is the NAME of the
      environment variable holding the API key; leave it empty, ``llm:URL:MODEL:``, for a server without a key)

    Options ``key=value`` trail the spec (a value cannot contain ``:``); every judge takes ``name=`` and ``weight=``.
    A model name containing ``:`` needs the dict form (YAML / JSON judges file).
    """
    parts = spec.split(":")
    options: dict[str, Any] = {}
    while len(parts) > 1 and _OPTION.match(parts[-1]):
        key, value = parts.pop().split("=", 1)
        options.setdefault(key, _coerce(value))  # read from the right: the last of a repeated option wins
    where = "judge spec: " if "api_key" in options else f"judge spec {spec!r}: "  # never echo a key
    kind, rest = parts[0].strip().lower(), ":".join(parts[1:])
    entry = judge_type(kind, where)
    pieces = rest.rsplit(":", len(entry.fields) - 1) if entry.fields else ([rest] if rest else [])
    if len(pieces) != len(entry.fields) or any(not p for f, p in zip(entry.fields, pieces) if f not in entry.optional):
        raise ResearchError(f"{where}{entry.usage}")
    parsed = {"type": kind, **{f: p or None for f, p in zip(entry.fields, pieces)}, **options}
    check_spec(parsed, where)
    return parsed


def read_judge_specs(path: str | Path) -> list[dict[str, Any]]:
    """A YAML or JSON list of judge specs (dicts, or spec strings); ``{"judges": [...]}`` works too."""
    from research.io import read_yaml_file

    path = Path(path)
    if path.suffix.lower() == ".json":
        try:
            loaded = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as err:
            raise DataFormatError(path, err.lineno, None, f"invalid JSON ({err.msg} at column {err.colno})") from None
    else:
        loaded = read_yaml_file(path, "judges file")  # missing, non-UTF-8, YAML syntax: one line with the line
    if isinstance(loaded, Mapping):
        loaded = loaded.get("judges")
    if not isinstance(loaded, list) or not loaded:
        raise ResearchError(f"{path}: expected a non-empty list of judge specs (or a mapping with 'judges:')")
    specs = []
    for i, item in enumerate(loaded):
        if isinstance(item, str):
            specs.append(parse_judge_spec(item))
        elif isinstance(item, Mapping) and item.get("type") in JUDGES:
            check_spec(item, f"{path}: judge {i}: ")
            specs.append(dict(item))
        else:
            raise ResearchError(f"{path}: judge {i}: expected a spec string or a mapping with type: {'|'.join(JUDGE_TYPES)}")
    return specs


def build_judge(spec: Mapping[str, Any], data: RetrievalDataset | None = None, device: str = "cpu") -> tuple[Judge, float]:
    """The judge a spec dict describes, and its ensemble weight. ``data`` (the corpus) is needed for BM25."""
    check_spec(spec)
    parameters = dict(spec)
    kind = parameters.pop("type")
    weight = float(parameters.pop("weight", 1.0))
    try:
        return JUDGES[kind].build(parameters, data, device), weight
    except TypeError as err:  # a value of the wrong kind (the names were checked above)
        raise ResearchError(f"judge {kind}: {err}") from None


def build_ensemble(specs: Sequence[Mapping[str, Any]], data: RetrievalDataset | None = None,
                   device: str = "cpu") -> Ensemble:
    """An :class:`Ensemble` of the judges ``specs`` describe; repeated names get ``#2``, ``#3``... suffixes."""
    judges, weights, seen = [], [], {}
    for spec in specs:
        judge, weight = build_judge(spec, data, device)
        base = judge.name
        seen[base] = seen.get(base, 0) + 1
        if seen[base] > 1:
            judge.name = f"{base}#{seen[base]}"
        judges.append(judge)
        weights.append(weight)
    return Ensemble(judges, weights)
