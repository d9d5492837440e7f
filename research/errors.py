"""Errors that name the file, line and field at fault."""

from __future__ import annotations

from pathlib import Path


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
