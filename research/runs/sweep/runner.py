"""Running a sweep offline: each run a ``research fit`` subprocess, its state on disk, one sweep per folder."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from research.errors import ResearchError
from research.io import atomic_write, write_json
from research.runs import layout
from research.runs.sweep.naming import config_label
from research.runs.sweep.spec import RunSpec, Sweep, SweepError, expand_runs, load_sweep, override_config


def fit_command(configs: Sequence[str], override: Path, run_dir: Path, name: str, fit_args: Sequence[str] = (),
                ckpt_path: Path | None = None) -> list[str]:
    """``python -m research.cli fit --config ... --config override.yaml --run_dir D --name N --overwrite true
    [--ckpt_path C]``: the run folder is the sweep's own, so what an unfinished attempt left there is replaced."""
    command = [*layout.RESEARCH_PROGRAM, "fit"]
    for config in configs:
        command += ["--config", str(config)]
    command += ["--config", str(override), "--run_dir", str(run_dir), "--name", name, "--overwrite", "true", *fit_args]
    if ckpt_path is not None:
        command += ["--ckpt_path", str(ckpt_path)]
    return command


# (the arguments after `research fit`) -> None, or a ResearchError saying why that fit would fail at the start
FitCheck = Callable[[list[str]], None]


def check_runs(sweep: Sweep, runs: Sequence[RunSpec], check: FitCheck, sweep_dir: Path) -> dict[str, str]:
    """The runs whose resolved configuration ``check`` refuses, with the reason: each run's override file is written
    to a temporary folder (nothing is written into the sweep folder) and parsed with its exact ``research fit``
    arguments."""
    import tempfile

    problems: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="sweep-check-") as tmp:
        for spec in runs:
            override = Path(tmp) / spec.run_id / layout.OVERRIDE_FILE
            override.parent.mkdir(parents=True, exist_ok=True)
            override.write_text(yaml.safe_dump(override_config(spec.params, spec.seed, sweep.seed_keys),
                                               sort_keys=False), encoding="utf-8")
            run_dir = sweep_dir / spec.run_id
            checkpoint = layout.last_checkpoint(run_dir)
            command = fit_command(sweep.configs, override, run_dir, sweep.name, sweep.fit_args,
                                  checkpoint if checkpoint.is_file() else None)
            try:
                check(command[len(layout.RESEARCH_PROGRAM) + 1:])
            except ResearchError as err:
                problems[spec.run_id] = str(err).replace(f"{override}:", f"{layout.OVERRIDE_FILE}:")
    return problems


def invalid_runs_error(sweep: Sweep, problems: dict[str, str]) -> SweepError:
    """One line: which parameter (its line in the sweep file) or run is at fault, and that nothing was run."""
    rid, reason = next(iter(problems.items()))
    more = f" and {len(problems) - 1} more run(s)" if len(problems) > 1 else ""
    where = str(sweep.path)
    for key in _parameter_keys(sweep):
        if key.replace(".init_args.", ".") in reason.replace(".init_args.", "."):
            line = _key_line(sweep.path, key) if sweep.path else None
            where = f"{sweep.path}:{line}: parameter '{key}'" if line else f"{sweep.path}: parameter '{key}'"
            break
    return SweepError(f"{where}: run {rid}{more} would fail at the start, so nothing was run: {reason}")


def _parameter_keys(sweep: Sweep) -> list[str]:
    keys = list(sweep.parameters)
    for spec in sweep.parameters.values():  # the dotted keys inside bundles
        for value in spec.get("values", []) if isinstance(spec.get("values"), list) else []:
            if isinstance(value, dict):
                keys += [k for k in value if "." in k]
    return sorted(set(keys), key=len, reverse=True)  # the most specific key first


def _key_line(path: Path, key: str) -> int | None:
    for number, text in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        stripped = text.strip().lstrip("{").strip()
        if stripped.startswith((f"{key}:", f"'{key}':", f'"{key}":')):
            return number
    return None


def failure_reason(log_path: Path, offset: int = 0) -> str:
    """Why an attempt failed, from its log (from ``offset``): the ``research: error:`` line, else the last line."""
    with open(log_path, "rb") as handle:
        handle.seek(offset)
        lines = [line.strip() for line in handle.read().decode("utf-8", "replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("research: error:")]
    return (errors[-1].removeprefix("research: error:").strip() if errors else lines[-1] if lines else "no output")[:500]


# A child sweep run dies with the sweep (SIGKILL included): PR_SET_PDEATHSIG survives exec.
_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(137)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def _launch(command: list[str], log, env: dict[str, str]) -> subprocess.Popen:
    if sys.platform.startswith("linux"):
        command = [sys.executable, "-c", _LAUNCHER, str(os.getpid()), *command]
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)


# ---------------------------------------------------------------- state
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class SweepState:
    """``sweep_state.json`` (atomic rewrites) and ``sweep_events.jsonl`` (appends), guarded by one lock."""

    def __init__(self, sweep_dir: Path, sweep: Sweep) -> None:
        self.dir = sweep_dir
        self.path = sweep_dir / layout.SWEEP_STATE_FILE
        self.events = sweep_dir / layout.SWEEP_EVENTS_FILE
        self._lock = threading.Lock()
        if self.path.is_file():
            self.data = json.loads(self.path.read_text(encoding="utf-8"))
        else:
            self.data = {"sweep": sweep.name, "file": str(sweep.path), "method": sweep.method, "created": _now(), "runs": {}}
        self.data["sweep_file_sha1"] = hashlib.sha1(sweep.path.read_bytes()).hexdigest() if sweep.path else None
        self.data["constants"] = sweep.constants  # research sweep --set: what the report needs to find the order

    def run(self, rid: str) -> dict[str, Any]:
        return self.data["runs"].get(rid, {})

    def update(self, rid: str, event: str | None = None, **fields: Any) -> None:
        with self._lock:
            entry = self.data["runs"].setdefault(rid, {"attempts": 0})
            entry.update(fields)
            self.data["updated"] = _now()
            write_json(self.path, self.data)
            if event:
                with open(self.events, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps({"time": _now(), "pid": os.getpid(), "event": event, "run": rid,
                                             **{k: v for k, v in fields.items() if k in ("returncode", "seconds", "resume_from")}}) + "\n")

    def event(self, event: str, **fields: Any) -> None:
        with self._lock, open(self.events, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"time": _now(), "pid": os.getpid(), "event": event, **fields}) + "\n")


@contextlib.contextmanager
def _exclusive(sweep_dir: Path):
    """One ``research sweep`` per sweep folder at a time (an flock, released when the process dies)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    handle = open(sweep_dir / layout.SWEEP_LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise SweepError(f"another `research sweep` is running in {sweep_dir}") from None
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def is_finished(run_dir: Path) -> bool:
    return (run_dir / layout.FINISHED_MARKER).is_file()


def sweep_dir_for(sweep: Sweep, root: str | Path = layout.SWEEPS_ROOT) -> Path:
    return Path(root) / sweep.name


# ---------------------------------------------------------------- running
@dataclass
class SweepResult:
    sweep_dir: Path
    finished: list[str]
    skipped: list[str]
    failed: list[str]
    pending: list[str]


class Runner:
    """Runs sweep runs (:meth:`execute`, from any number of worker threads); :meth:`terminate` stops them all."""

    def __init__(self, sweep: Sweep, sweep_dir: Path, state: SweepState, env: dict[str, str], quiet: bool) -> None:
        self.sweep, self.sweep_dir, self.state, self.env, self.quiet = sweep, sweep_dir, state, env, quiet
        self.stop = threading.Event()
        self.children: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"[sweep {self.sweep.name}] {text}", flush=True)

    def execute(self, spec: RunSpec) -> bool:
        """Run one configuration to the end; True when it finished (``FINISHED`` written)."""
        rid = spec.run_id
        run_dir = self.sweep_dir / rid
        if self.stop.is_set():
            return False
        run_dir.mkdir(parents=True, exist_ok=True)
        override = run_dir / layout.OVERRIDE_FILE
        with atomic_write(override) as handle:
            yaml.safe_dump(override_config(spec.params, spec.seed, self.sweep.seed_keys), handle, sort_keys=False)
        checkpoint = layout.last_checkpoint(run_dir)
        resume = checkpoint if checkpoint.is_file() else None
        command = fit_command(self.sweep.configs, override, run_dir, self.sweep.name, self.sweep.fit_args, resume)
        write_json(run_dir / layout.SWEEP_RUN_FILE, {
            "sweep": self.sweep.name, "sweep_file": str(self.sweep.path), "run_id": rid, "params": spec.params,
            "swept": spec.swept, "seed": spec.seed, "label": config_label(spec.swept), "command": command})
        attempts = self.state.run(rid).get("attempts", 0) + 1
        self.state.update(rid, "start", status="running", params=spec.params, seed=spec.seed, attempts=attempts,
                          started=_now(), resume_from=str(resume) if resume else None, pid=os.getpid())
        self.say(f"start {rid} (attempt {attempts}{', resuming from ' + str(resume) if resume else ''})")
        started = time.perf_counter()
        log_path = run_dir / layout.STDOUT_LOG
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"\n===== attempt {attempts} at {_now()}: {' '.join(command)}\n")
            log.flush()
            offset = log.tell()
            with self._lock:
                if self.stop.is_set():
                    return False
                process = _launch(command, log, self.env)
                self.children[rid] = process
            returncode = process.wait()
            with self._lock:
                self.children.pop(rid, None)
        seconds = round(time.perf_counter() - started, 1)
        metrics_path = run_dir / layout.EVAL_AFTER / layout.METRICS_FILE
        if returncode == 0 and metrics_path.is_file():
            metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
            write_json(run_dir / layout.FINISHED_MARKER, {
                "finished": _now(), "seconds": seconds, "attempts": attempts,
                "metrics": {k: v for k, v in metrics.items() if isinstance(v, float)}})
            self.state.update(rid, "finish", status="finished", returncode=0, seconds=seconds, finished=_now())
            if not self.sweep.keep_checkpoints:
                shutil.rmtree(run_dir / layout.CHECKPOINT_DIR, ignore_errors=True)
            self.say(f"finished {rid} in {seconds:.0f} s")
            return True
        status = "interrupted" if self.stop.is_set() else "failed"
        if returncode == 0 and status == "failed":
            returncode = f"exit 0 without {layout.EVAL_AFTER}/{layout.METRICS_FILE} (set test_after_fit: true)"
        reason = failure_reason(log_path, offset) if status == "failed" else None
        self.state.update(rid, status, status=status, returncode=returncode, seconds=seconds, reason=reason)
        self.say(f"{status} {rid} (return code {returncode}" + (f": {reason}" if reason else "") + f"; log: {log_path})")
        return False

    def terminate(self, grace: float = 30.0) -> None:
        self.stop.set()
        with self._lock:
            children = list(self.children.values())
        for process in children:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        deadline = time.monotonic() + grace
        for process in children:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()


def run_sweep(path: str | Path, parallel: int = 1, max_runs: int | None = None, root: str | Path = layout.SWEEPS_ROOT,
              quiet: bool = False, retry_failed: bool = True, check: FitCheck | None = None,
              constants: Mapping[str, Any] | None = None) -> SweepResult:
    """Run the grid/random sweep of ``path`` locally, skipping finished runs (see :mod:`research.runs.sweep`).

    With ``check`` (``research sweep`` passes the fit parser), every run to start is checked first: if any would fail
    at the start, nothing runs (:class:`SweepError` naming the parameter and the reason). ``constants``: as
    :func:`~research.runs.sweep.spec.load_sweep`'s."""
    sweep = load_sweep(path, constants)
    runs = expand_runs(sweep)
    if parallel < 1:
        raise SweepError("--parallel must be >= 1")
    sweep_dir = sweep_dir_for(sweep, root)
    with _exclusive(sweep_dir):
        state = SweepState(sweep_dir, sweep)
        env = dict(os.environ)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.setdefault("PYTHONUNBUFFERED", "1")  # the run log shows progress as it happens
        if parallel > 1 and "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
        runner = Runner(sweep, sweep_dir, state, env, quiet)
        skipped = [spec.run_id for spec in runs if is_finished(sweep_dir / spec.run_id)]
        todo = [spec for spec in runs if spec.run_id not in set(skipped)]
        if not retry_failed:
            todo = [spec for spec in todo if state.run(spec.run_id).get("status") != "failed"]
        for rid in skipped:
            if state.run(rid).get("status") != "finished":
                state.update(rid, None, status="finished")
        if max_runs is not None:
            todo = todo[:max_runs]
        if check is not None and todo and (problems := check_runs(sweep, todo, check, sweep_dir)):
            state.event("sweep_invalid", runs=sorted(problems))
            raise invalid_runs_error(sweep, problems)
        state.event("sweep_start", runs=len(runs), finished_before=len(skipped), to_run=len(todo), parallel=parallel)
        runner.say(f"{len(runs)} runs: {len(skipped)} already finished, {len(todo)} to run now "
                   f"({parallel} at a time) in {sweep_dir}")
        finished: list[str] = []
        failed: list[str] = []

        def on_signal(signum, _frame):
            runner.say(f"received signal {signum}: stopping the running runs")
            state.event("sweep_signal", signal=signum)
            runner.terminate()
            raise KeyboardInterrupt

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)} \
            if threading.current_thread() is threading.main_thread() else {}
        try:
            with ThreadPoolExecutor(max_workers=parallel) as pool:
                futures = {pool.submit(runner.execute, spec): spec for spec in todo}
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                    for future in done:
                        (finished if future.result() else failed).append(futures[future].run_id)
        except KeyboardInterrupt:
            runner.terminate()
            state.event("sweep_stop")
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        remaining = [spec.run_id for spec in runs if not is_finished(sweep_dir / spec.run_id)]
        state.event("sweep_end", finished=len(finished), failed=len(failed), remaining=len(remaining))
        return SweepResult(sweep_dir, finished, skipped, failed, remaining)


def status_table(path: str | Path, root: str | Path = layout.SWEEPS_ROOT,
                 check: FitCheck | None = None, constants: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Each run of a sweep with its status, attempts, seconds and, for a failed or ``invalid`` one (``check`` refuses
    its configuration), the reason (for ``research sweep FILE --status``)."""
    sweep = load_sweep(path, constants)
    sweep_dir = sweep_dir_for(sweep, root)
    state_path = sweep_dir / layout.SWEEP_STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"runs": {}}
    runs = expand_runs(sweep)
    unfinished = [spec for spec in runs if not is_finished(sweep_dir / spec.run_id)]
    problems = check_runs(sweep, unfinished, check, sweep_dir) if check is not None and unfinished else {}
    rows = []
    for spec in runs:
        entry = state["runs"].get(spec.run_id, {})
        status = "finished" if is_finished(sweep_dir / spec.run_id) else "invalid" if spec.run_id in problems \
            else entry.get("status", "pending")
        reason = problems.get(spec.run_id) or (entry.get("reason") if status == "failed" else None)
        rows.append({"run": spec.run_id, "label": config_label(spec.swept), "seed": spec.seed, "status": status,
                     "attempts": entry.get("attempts", 0), "seconds": entry.get("seconds"), "reason": reason})
    return rows
