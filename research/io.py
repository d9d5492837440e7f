"""File input/output: atomic writes and validated line-by-line readers."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from research.errors import DataFormatError


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Write to a temporary file beside ``path`` and rename it into place only on success.

    An interrupted writer leaves the previous file (or none) in place, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~process_umask())  # mkstemp makes 0600: give the file the permissions open() would
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@functools.lru_cache(maxsize=1)
def process_umask() -> int:
    """The process umask (read once: ``os.umask`` can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_write(path) as handle:
        json.dump(obj, handle, indent=2, sort_keys=False)
        handle.write("\n")


def write_jsonl(path: str | Path, records: Any) -> int:
    count = 0
    with atomic_write(path) as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False))
            handle.write("\n")
            count += 1
    return count


def iter_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)`` for each non-blank line, decoded as UTF-8 (a BOM and CRLF accepted).

    Non-UTF-8 bytes raise a :class:`DataFormatError` naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, None, None, "file not found")
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataFormatError(path, number, None, f"not valid UTF-8 (byte {err.start})") from None
            text = text.rstrip("\r\n")
            if text.strip():
                yield number, text


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` for each JSON object line of ``path``."""
    for number, text in iter_lines(path):
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataFormatError(path, number, None, f"invalid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise DataFormatError(path, number, None, f"expected a JSON object, got {type(record).__name__}")
        yield number, record


def require_field(
    record: dict[str, Any], field: str, kind: type | tuple[type, ...], path: str | Path, line: int,
    *, allow_empty: bool = False,
) -> Any:
    """Return ``record[field]`` checked for presence, type and (for strings) non-emptiness."""
    if field not in record:
        raise DataFormatError(path, line, field, "missing")
    value = record[field]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise DataFormatError(path, line, field, f"expected {_kind_name(kind)}, got bool")
    if not isinstance(value, kind):
        raise DataFormatError(path, line, field, f"expected {_kind_name(kind)}, got {type(value).__name__}")
    if isinstance(value, str) and not allow_empty and not value.strip():
        raise DataFormatError(path, line, field, "empty")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({str: "string", int: "integer", float: "number", list: "list", dict: "object"}.get(k, k.__name__) for k in kinds)


def read_yaml_file(path: str | Path, what: str = "file") -> Any:
    """``yaml.safe_load`` of a file, every problem one :class:`DataFormatError` naming the file and the line:
    missing, not UTF-8 (a BOM is accepted), or a YAML syntax error."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, None, None, f"{what} not found" if not path.exists() else "not a file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataFormatError(path, raw[:err.start].count(b"\n") + 1, None, f"not valid UTF-8 (byte {err.start})") from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        opened = any(word in str(err.context or "") for word in ("flow", "quoted", "simple key"))
        if err.context_mark is not None and (opened or mark is None or mark.index >= len(text.rstrip())):
            mark = err.context_mark  # an unclosed bracket or quote: point at where it was opened
        problem = " ".join(str(err.problem or err.context or "syntax error").split())
        raise DataFormatError(path, mark.line + 1 if mark else None, None, f"invalid YAML ({problem})") from None
    except yaml.YAMLError as err:
        raise DataFormatError(path, None, None, f"invalid YAML ({' '.join(str(err).split())})") from None


def yaml_key_line(path: Path, dotted: str) -> int | None:
    """The line of the deepest key of ``dotted`` found in ``path`` (the last part searched anywhere below the first)."""
    import yaml

    try:
        root = yaml.compose(path.read_text(encoding="utf-8-sig"), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    parts = [p for p in dotted.split(".") if p and p not in ("init_args", "dict_kwargs")]
    if not parts or root is None:
        return None

    def children(node: Any) -> Iterator[tuple[Any, Any]]:
        if isinstance(node, yaml.MappingNode):
            yield from node.value
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                yield from children(item)

    def find(node: Any, name: str, depth: int = 0) -> Any:
        for key, value in children(node):
            if key.value == name:
                return key, value
        if depth < 6:
            for _, value in children(node):
                if (found := find(value, name, depth + 1)) is not None:
                    return found
        return None

    best, node = None, root
    for part in parts:
        found = find(node, part)
        if found is None:
            break
        best, node = found[0].start_mark.line + 1, found[1]
    return best


def yaml_location(path: str | Path, key: str) -> str:
    """``FILE:LINE: field 'KEY'`` (the line of ``key`` in the YAML file, if found): the prefix of a one-line error."""
    line = yaml_key_line(Path(path), key)
    return f"{path}:{line}: field '{key}'" if line is not None else f"{path}: field '{key}'"


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Fill a temporary folder beside ``path``; on success it replaces ``path`` (the old one is removed only after).

    A failure leaves the previous folder untouched; a crash between the two renames leaves it as ``.<name>.old-*``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~process_umask())  # mkdtemp makes 0700: the permissions mkdir would give
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cache_root(kind: str) -> Path:
    """``$RESEARCH_CACHE_DIR/<kind>`` (default ``~/.cache/research/<kind>``): the one root of every cache (offset
    indexes, corpus embeddings, LLM states)."""
    return Path(os.environ.get("RESEARCH_CACHE_DIR") or Path.home() / ".cache" / "research").expanduser() / kind
