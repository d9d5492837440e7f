"""Progress of long loops on stderr: the one reporter of every stage a command runs (encoding, searching, scoring,
judging, fitting): a live line with count, rate and ETA on a terminal, one line per finished stage otherwise.

    with progress.stage("encoding documents", total=len(texts), unit="texts") as step:
        for batch in batches:
            ...
            step.advance(len(batch))

Only the outermost stage reports: a stage opened inside another (the scorer's batches inside ``judging pairs``)
shows as a suffix of the outer live line on a terminal and prints nothing otherwise, so that a library loop can
always open a stage without flooding the log of the loop that calls it. :func:`configure` picks the mode
(``research --quiet`` commands set ``quiet``); the stream is looked up at each write (``sys.stderr`` by default), so
captured and redirected stderr work.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

AUTO, LIVE, LINES, QUIET = "auto", "live", "lines", "quiet"
MODES = (AUTO, LIVE, LINES, QUIET)
REFRESH_SECONDS = 0.2  # a live line is redrawn at most this often

_settings: dict[str, object] = {"mode": AUTO, "stream": None}
_local = threading.local()
T = TypeVar("T")


def configure(mode: str = AUTO, stream: TextIO | None = None) -> None:
    """``auto`` (live on a terminal, one line per stage otherwise), ``live``, ``lines`` or ``quiet``; ``stream``:
    where to write (``None``: the current ``sys.stderr``)."""
    if mode not in MODES:
        raise ValueError(f"progress mode {mode!r}: choose from {', '.join(MODES)}")
    _settings["mode"], _settings["stream"] = mode, stream


def mode() -> str:
    return str(_settings["mode"])


def _stream() -> TextIO:
    return _settings["stream"] or sys.stderr  # type: ignore[return-value]


def _live(stream: TextIO) -> bool:
    if _settings["mode"] == LIVE:
        return True
    isatty = getattr(stream, "isatty", None)
    return _settings["mode"] == AUTO and bool(isatty and isatty())


def _stack() -> list[Stage]:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def finished() -> int:
    """How many outermost stages have finished in this thread: a caller compares two readings to tell whether the code
    it called reported its own work."""
    return getattr(_local, "finished", 0)


def duration(seconds: float) -> str:
    """``4.2 s``, ``3:07`` or ``1:02:03``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _count(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 or value == int(value) else f"{value:.1f}"


class Stage:
    """One stage's counter: :meth:`advance` as work is done; the reporter draws and closes it."""

    def __init__(self, label: str, total: int | None, unit: str, parent: Stage | None) -> None:
        self.label, self.total, self.unit, self.parent = label, total, unit, parent
        self.done = 0
        self.started = time.perf_counter()
        self.child: Stage | None = None
        self._drawn = 0.0
        stream = _stream()
        self.shown = parent is None and mode() != QUIET
        self.live = self.shown and _live(stream)

    @property
    def root(self) -> Stage:
        return self if self.parent is None else self.parent.root

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    @property
    def rate(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def advance(self, count: int = 1) -> None:
        self.done += count
        root = self.root
        if root.live and time.perf_counter() - root._drawn >= REFRESH_SECONDS:
            root._draw()

    def status(self) -> str:
        """``label 120/300 texts (40%) 55 texts/s ETA 3.3 s``: the live line's text."""
        text = f"{self.label} {self.done:,}" + (f"/{self.total:,}" if self.total is not None else "") + f" {self.unit}"
        if self.total:
            text += f" ({100 * self.done / self.total:.0f}%)"
        if self.done and self.seconds > 0:
            text += f" {_count(self.rate)} {self.unit}/s"
            if self.total:
                text += f" ETA {duration(max(0.0, self.total - self.done) / self.rate)}"
        return text

    def summary(self) -> str:
        """``label: 300 texts in 5.4 s (55 texts/s)``: the line a finished stage leaves."""
        text = f"{self.label}: {self.done:,} {self.unit} in {duration(self.seconds)}"
        return text + (f" ({_count(self.rate)} {self.unit}/s)" if self.done and self.seconds > 0 else "")

    def _draw(self) -> None:
        self._drawn = time.perf_counter()
        text = self.status()
        child = self.child
        while child is not None:
            text += f" | {child.status()}"
            child = child.child
        stream = _stream()
        stream.write(f"\r{text}\x1b[K")
        stream.flush()

    def _close(self, failed: bool) -> None:
        if not self.shown:
            return
        stream = _stream()
        if self.live:
            stream.write("\r\x1b[K" if failed else f"\r{self.summary()}\x1b[K\n")
        elif not failed:  # a failing stage leaves nothing: the error that stopped it is the line to read
            stream.write(self.summary() + "\n")
        stream.flush()


@contextlib.contextmanager
def stage(label: str, total: int | None = None, unit: str = "items") -> Iterator[Stage]:
    """A stage of work that reports while it runs (see the module docstring)."""
    stack = _stack()
    parent = stack[-1] if stack else None
    current = Stage(label, total, unit, parent)
    if parent is not None:
        parent.child = current
    stack.append(current)
    failed = True
    try:
        if current.live:
            current._draw()
        yield current
        failed = False
    finally:
        stack.pop()
        if parent is not None:
            parent.child = None
        else:
            _local.finished = finished() + 1
        current._close(failed)


def track(items: Iterable[T], label: str, total: int | None = None, unit: str = "items") -> Iterator[T]:
    """Yield ``items``, one :meth:`Stage.advance` each, inside a :func:`stage`."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with stage(label, total, unit) as current:
        for item in items:
            yield item
            current.advance()
