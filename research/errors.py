"""Errors that name the file, line and field at fault."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any


class ResearchError(Exception):
    """Base class for errors the CLI reports as one line, without a traceback."""


class DataFormatError(ResearchError, ValueError):
    """A record in an input file is malformed: names the file, the line (1-based) and the field."""

    def __init__(self, path: str | Path, line: int | None, field: str | None, message: str):
        if len(message) > 500:  # a huge offending value is quoted in part: the error stays one readable line
            message = message[:497] + "..."
        self.path, self.line, self.field, self.reason = str(path), line, field, message
        where = self.path if line is None else f"{self.path}:{line}"
        what = f" field '{field}'" if field else ""
        super().__init__(f"{where}:{what} {message}")


class ModelNotFoundError(ResearchError, FileNotFoundError):
    """A model name resolves to no weights; the message says what to install or set."""


def user_error(err: BaseException) -> str | None:
    """The one-line message of an expected user error in ``err``'s chain (a :class:`ResearchError` wrapped by
    jsonargparse, a missing or unreadable file), or None for a bug (which keeps its traceback)."""
    seen: set[int] = set()
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    for item in chain:
        if isinstance(item, ResearchError):
            return str(item)
    for item in chain:
        if isinstance(item, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            name = item.filename or ""
            reason = {FileNotFoundError: "file not found", PermissionError: "permission denied",
                      IsADirectoryError: "is a folder, expected a file",
                      NotADirectoryError: "not a folder"}.get(type(item), item.strerror or str(item))
            return f"{name}: {reason}" if name else " ".join(str(item).split())
        if isinstance(item, ValueError) and "contains custom code which must be executed" in str(item):
            first = str(item).split(" You can inspect")[0].strip()
            return (f"{first} It is not executed unless you trust it: set trust_remote_code: true in the model's "
                    "config (research evaluate --trust-remote-code)")
        if type(item) is OSError and "does not appear to have a file named" in str(item):
            return " ".join(str(item).split())  # transformers: a model folder without config/weights
    return None


def run_tool(main: Any, argv: list[str] | None = None) -> int:
    """Run a ``python -m`` tool's ``main(argv)`` like ``research``: an expected user error is one line
    (``research: error: ...``, no traceback) and exit code 2; a bug keeps its traceback."""
    try:
        main(argv)
        return 0
    except Exception as err:
        message = user_error(err)
        if message is None or os.environ.get("RESEARCH_DEBUG"):
            raise
        print(f"research: error: {message}", file=sys.stderr)
        return 2
