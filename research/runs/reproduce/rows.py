"""The row kinds of a baselines file: one small class each, with the commands it runs, the outputs it leaves and
the values it should score."""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import ClassVar

from research.runs import layout

# ``${rows.NAME}`` (that row's main output) or ``${rows.NAME.OUTPUT}``; ``${out}`` is the row's own folder
REFERENCE = re.compile(r"\$\{rows\.([A-Za-z0-9_-]+)(?:\.([A-Za-z_]+))?\}")
OWN_FOLDER = "${out}"


@dataclass
class MetricTarget:
    name: str
    expected: float | None = None
    published: float | None = None
    tolerance: float = 0.002

    def check(self, measured: float | None) -> str:
        if measured is None or math.isnan(measured):
            return "error"
        if self.expected is None:
            return "measured"
        return "pass" if abs(measured - self.expected) <= self.tolerance + 1e-12 else "FAIL"


@dataclass
class Row:
    """One baseline: commands that leave outputs in the row's folder, and the values its run file should score.

    A row without ``metrics`` (only ``fit`` and ``command`` rows may omit them) produces artefacts for other rows and
    scores nothing. :meth:`outputs` names what other rows may consume (``out``: the folder; ``run``: the run file;
    ``model`` ...); :attr:`main_output` is the one ``{row: NAME}`` means.
    """

    kind: ClassVar[str] = ""
    name: str
    data: str
    split: str = "test"
    metrics: list[MetricTarget] = field(default_factory=list)
    relevance_level: int = 1
    queries_without_relevant: str = "exclude"  # or "trec_eval" (research.eval.metrics)
    enabled: bool = True
    source: str | None = None
    notes: str | None = None
    top_k: int = 100
    precision: str = "32-true"
    needs: tuple[str, ...] = ()  # the rows whose outputs this one consumes (from its references)

    #: row keys the subclass reads (besides the common ones)
    fields: ClassVar[tuple[str, ...]] = ()
    #: kinds whose rows may leave out ``metrics`` (they produce what other rows consume)
    may_produce_only: ClassVar[bool] = False
    main_output: ClassVar[str] = "run"

    @property
    def reference_fields(self) -> tuple[str, ...]:
        """The fields that may name another row's output."""
        return ("data", *self.fields)

    def command(self, out: Path) -> list[str]:
        """The ``research ...`` arguments that write this row's outputs under ``out``."""
        raise NotImplementedError

    def commands(self, out: Path) -> list[list[str]]:
        """Every command line of the row, program first (``research`` is run as :data:`layout.RESEARCH_PROGRAM`)."""
        return [["research", *self.command(out)]]

    def run_path(self, out: Path) -> Path:
        return out / layout.RUN_FILE

    def outputs(self, out: Path) -> dict[str, Path]:
        found = {"out": out}
        if self.metrics:
            found["run"] = self.run_path(out)
        return found

    def main_output_path(self, out: Path) -> Path:
        outputs = self.outputs(out)
        return outputs.get(self.main_output, outputs.get("run", out))

    def extra_outputs(self, out: Path) -> list[Path]:
        """Outputs outside the row folder (deleted with it before the row runs)."""
        return []

    def describe(self) -> str:
        return self.kind

    def resolved(self, substitute: Callable[[str], str]) -> Row:
        """A copy with every reference in its string fields replaced by ``substitute`` (a path)."""
        changes = {}
        for spec in fields(self):
            if spec.name not in self.reference_fields:
                continue
            value = getattr(self, spec.name)
            if isinstance(value, str):
                changes[spec.name] = substitute(value)
            elif isinstance(value, list) and all(isinstance(v, str) for v in value):
                changes[spec.name] = [substitute(v) for v in value]
        return replace(self, **changes)


def by_name(text: str) -> str:
    """``${rows.NAME...}`` shown as ``NAME`` (the table names a consumed row, not a path on this machine)."""
    return REFERENCE.sub(lambda m: m.group(1) + (f" {m.group(2)}" if m.group(2) else ""), text)


@dataclass
class BM25Row(Row):
    kind: ClassVar[str] = "bm25"
    fields: ClassVar[tuple[str, ...]] = ("k1", "b")
    k1: float = 1.5
    b: float = 0.75

    def command(self, out: Path) -> list[str]:
        return ["bm25", "--data", self.data, "--split", self.split, "--out", str(out), "--top-k", str(self.top_k),
                "--k1", str(self.k1), "--b", str(self.b)]

    def describe(self) -> str:
        return f"BM25 (bm25s, k1={self.k1}, b={self.b})"


@dataclass
class DenseEvalRow(Row):
    kind: ClassVar[str] = "dense"
    fields: ClassVar[tuple[str, ...]] = ("model", "max_length", "batch_size")
    model: str = ""
    max_length: int | None = None
    batch_size: int = 16

    def command(self, out: Path) -> list[str]:
        command = ["evaluate", "--model", self.model, "--data", self.data, "--split", self.split, "--out", str(out),
                   "--top-k", str(self.top_k), "--precision", self.precision, "--batch-size", str(self.batch_size)]
        if self.max_length is not None:
            command += ["--max-length", str(self.max_length)]
        return command

    def describe(self) -> str:
        return f"dense {by_name(self.model).split('/')[-1]} zero-shot ({self.precision}, batch {self.batch_size})"


@dataclass
class FitEvalRow(Row):
    """``research fit`` (configs + extra arguments) into ``out``: its outputs are the run folder and ``out/model``;
    with metrics, the run file ``out/eval_after/run.trec`` is scored."""

    kind: ClassVar[str] = "fit"
    fields: ClassVar[tuple[str, ...]] = ("configs", "args")
    may_produce_only: ClassVar[bool] = True
    main_output: ClassVar[str] = "model"
    configs: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)

    def command(self, out: Path) -> list[str]:
        command = ["fit"]
        for config in self.configs:
            command += ["--config", config]
        return command + ["--run_dir", str(out), "--name", self.name, *self.args]

    def run_path(self, out: Path) -> Path:
        return out / layout.EVAL_AFTER / layout.RUN_FILE

    def outputs(self, out: Path) -> dict[str, Path]:
        return {**super().outputs(out), "model": out / layout.MODEL_DIR}

    def describe(self) -> str:
        return "fit" + (", then test" if self.metrics else "") + ": " + " + ".join(Path(c).stem for c in self.configs)


@dataclass
class RerankRow(Row):
    """``research rerank`` of a candidate run; with ``train`` configs, fit the re-ranker first (``out/train/model``).

    With ``interpolate: W`` the row scores ``out/interpolated/run.trec``: W x z(re-ranker) + (1 - W) x z(candidates);
    with ``interpolate_on: SPLIT`` the same at the weight with the best nDCG@10 on that (validation) split.
    """

    kind: ClassVar[str] = "rerank"
    fields: ClassVar[tuple[str, ...]] = ("model", "train", "train_args", "candidates", "batch_size", "max_length",
                                         "interpolate", "interpolate_on")
    model: str | None = None
    train: list[str] = field(default_factory=list)
    train_args: list[str] = field(default_factory=list)
    candidates: str = "bm25"
    batch_size: int = 32
    max_length: int | None = None
    interpolate: float | None = None
    interpolate_on: str | None = None

    @property
    def interpolated(self) -> bool:
        return self.interpolate is not None or self.interpolate_on is not None

    def model_path(self, out: Path) -> str:
        return self.model if self.model else str(out / layout.ROW_TRAIN_DIR / layout.MODEL_DIR)

    def command(self, out: Path) -> list[str]:
        command = ["rerank", "--model", self.model_path(out), "--data", self.data, "--split", self.split,
                   "--candidates", self.candidates, "--top-k", str(self.top_k), "--out", str(out),
                   "--precision", self.precision, "--batch-size", str(self.batch_size)]
        if self.max_length is not None:
            command += ["--max-length", str(self.max_length)]
        if self.interpolate is not None:
            command += ["--interpolate", str(self.interpolate)]
        if self.interpolate_on is not None:
            command += ["--interpolate-on", self.interpolate_on]
        return command

    def run_path(self, out: Path) -> Path:
        return (out / layout.INTERPOLATED_DIR if self.interpolated else out) / layout.RUN_FILE

    def outputs(self, out: Path) -> dict[str, Path]:
        # an interpolating re-rank also leaves the re-ranker's own run: a score row reads it without re-ranking again
        return {**super().outputs(out), **({"raw": out / layout.RUN_FILE} if self.interpolated else {})}

    def commands(self, out: Path) -> list[list[str]]:
        if not self.train:
            return super().commands(out)
        fit = ["research", "fit"]
        for config in self.train:
            fit += ["--config", config]
        fit += ["--run_dir", str(out / layout.ROW_TRAIN_DIR), "--name", f"{self.name}-train", *self.train_args]
        return [fit, *super().commands(out)]

    def describe(self) -> str:
        what = by_name(self.model) if self.model else " + ".join(Path(c).stem for c in self.train)
        fused = ""
        if self.interpolate is not None:
            fused = f", interpolated {self.interpolate:g}/{1 - self.interpolate:g} with {by_name(self.candidates)}"
        elif self.interpolate_on is not None:
            fused = f", interpolated with {by_name(self.candidates)} (weight chosen on {self.interpolate_on})"
        return f"{by_name(self.candidates)} top-{self.top_k} re-ranked by {what}{fused}"


@dataclass
class CommandRow(Row):
    """Any command lines (``research ...`` or a script), run in order; ``${out}`` in them is the row's folder.

    With metrics, the run file ``run_file`` (relative to the folder, default ``run.trec``) is scored. ``output``
    names the row's main output for consumers; it may lie outside the folder (e.g. ``runs/data/scifact-dev``), and
    is then deleted with the folder before the row runs. Without it the main output is the run file, or the folder.
    """

    kind: ClassVar[str] = "command"
    fields: ClassVar[tuple[str, ...]] = ("command", "run_file", "output")
    may_produce_only: ClassVar[bool] = True
    main_output: ClassVar[str] = "output"
    command: list[str] = field(default_factory=list)  # type: ignore[assignment]  # command lines, not one argv
    run_file: str = layout.RUN_FILE
    output: str | None = None

    def commands(self, out: Path) -> list[list[str]]:
        return [shlex.split(line.replace(OWN_FOLDER, str(out))) for line in self.command]

    def run_path(self, out: Path) -> Path:
        return out / self.run_file.replace(OWN_FOLDER, str(out))

    def outputs(self, out: Path) -> dict[str, Path]:
        output = self.output_path(out)
        return {**super().outputs(out), **({"output": output} if output is not None else {})}

    def output_path(self, out: Path) -> Path | None:
        return Path(self.output.replace(OWN_FOLDER, str(out))) if self.output else None

    def extra_outputs(self, out: Path) -> list[Path]:
        path = self.output_path(out)
        return [path] if path is not None and not path.resolve().is_relative_to(out.resolve()) else []

    def describe(self) -> str:
        return "command: " + " && ".join(by_name(line).split(" --")[0] for line in self.command)


@dataclass
class ScoreRow(Row):
    """Scores a run file that another row writes (``run: ${rows.NAME.OUTPUT}``) and runs nothing itself, so that one
    run serves two rows: a re-ranker's own run beside its interpolation, made by one ``research rerank``."""

    kind: ClassVar[str] = "score"
    fields: ClassVar[tuple[str, ...]] = ("run",)
    run: str = ""

    def commands(self, out: Path) -> list[list[str]]:
        return []

    def run_path(self, out: Path) -> Path:
        return Path(self.run)

    def describe(self) -> str:
        return f"score: {by_name(self.run)}"


ROW_KINDS: dict[str, type[Row]] = {cls.kind: cls for cls in (BM25Row, DenseEvalRow, FitEvalRow, RerankRow, CommandRow,
                                                             ScoreRow)}
