"""What ``research`` does so that a run survives bad input and interruptions (docs/reliability.md).

* :class:`ResumableDataLoader`: its position within an epoch goes into Lightning checkpoints; a resumed run skips
  the batches it already trained on (without loading them) instead of replaying the epoch from its start.
* :func:`check_config_files` / :func:`one_line_config_errors`: YAML configs checked before LightningCLI reads them;
  every config problem is one line naming the file, the line and the field.
* :func:`check_resume`: ``--ckpt_path last`` resumes ``<run_dir>/checkpoints/last.ckpt``; an existing checkpoint is
  never overwritten by a fresh run that was not asked to resume.
* :func:`default_callbacks` / :func:`install_atomic_checkpoint_io`: what the CLI adds to every trainer.
* :func:`user_error`: the message of an expected user error (bad file, missing model) hidden in an exception chain.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from research.errors import DataFormatError, ResearchError
from research.io import process_umask

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
DEFAULT_CHECKPOINT_EVERY_N_STEPS = 500


# ---------------------------------------------------------------- resumable data loading
class _SkipFirst:
    """An index (batch) sampler whose first iteration leaves out its first ``skip`` batches; later iterations (the
    next epochs, with persistent workers) are whole."""

    def __init__(self, sampler: Any, skip: int) -> None:
        self.sampler, self.pending, self.active = sampler, skip, skip

    def __iter__(self) -> Iterator[Any]:
        # a generator: the skip is used by the first iteration that draws (torch's multiprocessing iterator calls
        # iter() twice and keeps the second)
        skip, self.pending = self.pending, 0
        self.active = skip
        yield from itertools.islice(iter(self.sampler), skip, None)

    def __len__(self) -> int:
        return len(self.sampler) - self.active


class _LazyIterator:
    """Starts the DataLoader's iterator at the first ``next()``: after Lightning's ``set_epoch`` and after a resumed
    position was loaded (workers would otherwise prefetch indices of the wrong epoch when ``iter()`` is called)."""

    def __init__(self, loader: ResumableDataLoader) -> None:
        self._loader, self._iterator = loader, None

    def __iter__(self) -> _LazyIterator:
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            self._iterator = self._loader._start()
        batch = next(self._iterator)
        self._loader._position += 1
        return batch

    def __len__(self) -> int:
        return len(self._loader) if self._iterator is None else len(self._iterator)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose position within the epoch is saved in Lightning checkpoints.

    A plain ``DataLoader`` is not stateful: a run resumed from a mid-epoch checkpoint replays the epoch from its first
    batch (Lightning warns "your dataloader is not resumable"), so it trains on other batches than the uninterrupted
    run. This loader counts the batches it handed out in the current epoch (``state_dict``, which Lightning stores in
    every checkpoint); after ``load_state_dict`` the next iteration leaves them out at the index level (no dataset
    access), if it is the same epoch. The order must be a function of the epoch (``EpochShuffleSampler``).

    Lightning 2.6 calls ``load_state_dict`` only if the train loader was not built earlier (``configure_optimizers``
    reading ``trainer.estimated_stepping_batches`` builds it before the checkpoint is restored), so
    :class:`research.callbacks.ExactResume` hands the saved position over again at ``on_train_start``; the iterator
    starts at the first batch, so either way the position is in place before any index is drawn.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._position = 0
        self._resume: tuple[int | None, int] | None = None
        self._skip: int | None = None

    def _sampler_epoch(self) -> int | None:
        for sampler in (self.sampler, getattr(self.batch_sampler, "sampler", None)):
            epoch = getattr(sampler, "epoch", None)
            if isinstance(epoch, int):
                return epoch
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._sampler_epoch(), "batches": self._position}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        batches = int(state_dict.get("batches", 0))
        self._resume = (state_dict.get("epoch"), batches) if batches > 0 else None

    @property
    def _index_sampler(self) -> Any:
        sampler = DataLoader._index_sampler.fget(self)
        return sampler if self._skip is None else _SkipFirst(sampler, self._skip)

    def __iter__(self) -> _LazyIterator:
        self._position = 0
        return _LazyIterator(self)

    def _start(self) -> Iterator[Any]:
        """The real iterator, without the batches a resumed epoch already trained on."""
        resume, self._resume = self._resume, None
        skip = 0
        if resume is not None:
            epoch, batches = resume
            current = self._sampler_epoch()
            same_epoch = epoch == current if epoch is not None and current is not None else batches < len(self)
            skip = min(batches, len(self)) if same_epoch else 0
        self._skip = skip or None
        try:
            iterator = super().__iter__()
        finally:
            self._skip = None
        self._position = skip
        return iterator


# ---------------------------------------------------------------- config files
def config_files(args: list[str] | None) -> list[Path]:
    """The files given with ``--config X``, ``--config=X`` or ``-c X``."""
    files, args = [], list(args or [])
    for index, arg in enumerate(args):
        if arg in ("--config", "-c") and index + 1 < len(args):
            files.append(Path(args[index + 1]))
        elif arg.startswith("--config="):
            files.append(Path(arg.split("=", 1)[1]))
    return files


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


def check_config_files(args: list[str] | None) -> None:
    """Each ``--config`` file exists, is UTF-8 and is a YAML mapping; otherwise one error naming file and line."""
    for path in config_files(args):
        loaded = read_yaml_file(path, "config file")
        if loaded is None:
            raise DataFormatError(path, None, None, "empty config (expected a YAML mapping of options)")
        if not isinstance(loaded, dict):
            raise DataFormatError(path, 1, None, f"expected a YAML mapping of options, got a {type(loaded).__name__}")


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


_KEY = r"""["']([\w.\-\[\]]+)["']"""


def _condense(message: str) -> tuple[str | None, str]:
    """(field path, one-line reason) from a jsonargparse error message."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return None, "invalid arguments"
    first = lines[0]
    if m := re.search(r"does not accept (?:nested key|option|key)s? " + _KEY, first):
        return m.group(1), "is not an accepted option"
    if m := re.search(r"Key " + _KEY + r" not found", first):
        return m.group(1), "is not an accepted option"
    if m := re.search(r"File does not exist: " + _KEY, message):
        return None, f"{m.group(1)}: config file not found"
    field = None
    if m := re.match(r'Parser key "([^"]+)"', first):
        field = m.group(1)
    nested = re.findall(r'Parser key "([^"]+)"', message)[1:]
    for key in nested:
        field = f"{field}.{key}" if field else key
    if m := re.search(r"Option " + _KEY + r" is not accepted", message):
        return (f"{field}.{m.group(1)}" if field else m.group(1)), "is not an accepted option"
    for index in range(len(lines) - 2, -1, -1):  # the deepest class_path problem with a reason of its own
        if (m := re.match(r"- Problem with given class_path " + _KEY, lines[index])) and not lines[index + 1].startswith(
                ("Parser key", "Does not validate", "- ", "Option")):
            return field, f"class_path {m.group(1)!r}: {' '.join(lines[index + 1].split())[:200]}"
    expected = [(i, m.group(1)) for i, line in enumerate(lines) if (m := re.search(r"Expected a <class '(\w+)'>", line))
                and m.group(1) != "NoneType"]
    if expected:
        index, kind = expected[-1]
        given = next((line for line in lines[index:] if line.startswith("Given value:")), None)
        return field, f"expected {kind}" + (f", got {given.split(':', 1)[1].strip()[:80]!r}" if given else "")
    skip = ("Does not validate", "Subtypes:", "Errors:", "Given value", "- Problem with given class_path",
            "- Expected a <class 'NoneType'>", "Parser key")
    reasons = [line.lstrip("- ") for line in lines[1:] if not line.startswith(skip)]
    reason = reasons[0] if reasons else first
    return field, " ".join(reason.split())[:300]


@contextlib.contextmanager
def one_line_config_errors(args: list[str] | None) -> Iterator[None]:
    """Check the config files, then turn a jsonargparse parse failure (usage text, exit 2) into one
    :class:`DataFormatError` naming the config file, the line and the field (``--help`` passes through)."""
    check_config_files(args)
    warn_secrets_on_command_line(args)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    except SystemExit as exit_:
        if exit_.code in (0, None):
            sys.stderr.write(captured.getvalue())
            raise
        text = captured.getvalue()
        message = text.split("error: ", 1)[1] if "error: " in text else text
        field, reason = _condense(message)
        on_command_line = field is not None and any(
            arg.lstrip("-").split("=", 1)[0] in (field, field.replace(".init_args.", ".")) for arg in args or []
            if arg.startswith("--"))
        if field is None:
            raise ResearchError(reason) from None
        if on_command_line:
            raise ResearchError(f"--{field}: {reason}") from None
        for path in reversed(config_files(args)):  # later files override earlier ones
            if (line := yaml_key_line(path, field)) is not None:
                raise DataFormatError(path, line, field, reason) from None
        raise ResearchError(f"field '{field}' {reason}") from None
    else:
        sys.stderr.write(captured.getvalue())


def warn_secrets_on_command_line(args: list[str] | None) -> None:
    """One warning line if an option that looks like a secret (``--judge.api_key``) is given on the command line."""
    from research.safety import is_secret_key

    names = [arg.lstrip("-").split("=", 1)[0] for arg in args or [] if arg.startswith("--")]
    secret = [name for name in names if is_secret_key(name.rsplit(".", 1)[-1])]
    if secret:
        print(f"research: warning: --{', --'.join(secret)} on the command line: redacted in run_info.json and "
              "config.yaml, but visible to `ps`, kept in shell history and recorded by W&B; pass secrets through "
              "environment variables", file=sys.stderr)


# ---------------------------------------------------------------- resuming
def last_checkpoint(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / LAST_CHECKPOINT


def check_resume(subcommand: str, run_dir: str | Path | None, ckpt_path: str | None,
                 argv: list[str] | None = None) -> None:
    """Refuse to start a fresh ``fit`` over an earlier run's checkpoints; explain ``--ckpt_path last``."""
    if subcommand != "fit":
        return
    if ckpt_path == "last" and not run_dir:
        raise ResearchError("--ckpt_path last resumes the run in --run_dir: give --run_dir DIR (the run to resume)")
    if not run_dir:
        return  # a new timestamped run directory
    last = last_checkpoint(run_dir)
    if ckpt_path == "last":
        if not launched_as_rank_zero():
            return  # a process Lightning (or torchrun) started for another rank: rank 0 keeps the records and reports
        if last.is_file():
            kept = keep_attempt_records(run_dir)
            print(f"research: resuming from {last}" + (f" (the interrupted attempt's records kept as {kept})"
                                                       if kept else ""), file=sys.stderr)
        else:
            print(f"research: no checkpoint to resume in {last.parent}: training from the start", file=sys.stderr)
    elif ckpt_path is None and last.is_file():
        command = "research " + " ".join(argv or ["fit", "..."])
        raise ResearchError(
            f"{run_dir} holds an earlier run's checkpoint {last}: resume it with `{command} --ckpt_path last`, "
            f"or start over in another --run_dir (or after deleting {last.parent})"
        )


def launched_as_rank_zero() -> bool:
    """False in the processes a launcher started for the other ranks (``LOCAL_RANK``/``NODE_RANK``/``RANK``/
    ``SLURM_PROCID`` set and non-zero)."""
    return all(os.environ.get(name, "0") in ("", "0") for name in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"))


ATTEMPT_RECORDS = ("run_info.json", "config.yaml", "metrics.csv", "hparams.yaml")


def keep_attempt_records(run_dir: str | Path) -> str | None:
    """Before a resume rewrites them, rename the run directory's records of the interrupted attempt
    (``run_info.json``, ``config.yaml``, ``metrics.csv``, ``hparams.yaml``) to ``<name>.attempt<k>.<ext>``."""
    run_dir = Path(run_dir)
    present = [name for name in ATTEMPT_RECORDS if (run_dir / name).is_file()]
    if not present:
        return None
    attempt = 1
    while any((run_dir / _attempt_name(name, attempt)).exists() for name in ATTEMPT_RECORDS):
        attempt += 1
    for name in present:
        os.replace(run_dir / name, run_dir / _attempt_name(name, attempt))
    return str(run_dir / f"*.attempt{attempt}.*")


def _attempt_name(name: str, attempt: int) -> str:
    stem, dot, ext = name.rpartition(".")
    return f"{stem}.attempt{attempt}.{ext}" if dot else f"{name}.attempt{attempt}"


# ---------------------------------------------------------------- trainer defaults
def default_callbacks(configured: Any, *, enable_checkpointing: bool | None, skip_nonfinite_batches: bool,
                      checkpoint_every_n_steps: int) -> list[Any]:
    """The configured callbacks plus what ``research fit`` adds unless configured: a step-interval
    ``ModelCheckpoint(save_last=True)``, :class:`NonFiniteLossGuard` and :class:`ExactResume`."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from research.callbacks import NonFiniteLossGuard, ExactResume

    callbacks = [] if configured is None else list(configured) if isinstance(configured, (list, tuple)) else [configured]
    kinds = tuple(type(c) for c in callbacks)
    if enable_checkpointing is not False and checkpoint_every_n_steps > 0 and not any(
            issubclass(k, ModelCheckpoint) for k in kinds):
        callbacks.append(ModelCheckpoint(every_n_train_steps=checkpoint_every_n_steps, save_last=True, save_top_k=0))
    if not any(issubclass(k, NonFiniteLossGuard) for k in kinds):
        callbacks.append(NonFiniteLossGuard(skip_nonfinite_batches=skip_nonfinite_batches))
    if not any(issubclass(k, ExactResume) for k in kinds):
        callbacks.append(ExactResume())
    return callbacks


def install_atomic_checkpoint_io(trainer: Any) -> None:
    """Use :class:`AtomicCheckpointIO` where the strategy would use Lightning's plain ``TorchCheckpointIO``."""
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from research.callbacks import AtomicCheckpointIO

    strategy = trainer.strategy
    try:
        current = strategy.checkpoint_io
    except (AttributeError, NotImplementedError):
        return
    if type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


# ---------------------------------------------------------------- atomic folders
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


# ---------------------------------------------------------------- errors
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
