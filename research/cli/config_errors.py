"""Config problems as one line: ``--config`` files checked before LightningCLI reads them, jsonargparse's
errors condensed to the file, line and field, and a warning for secrets given on the command line."""

from __future__ import annotations

import contextlib
import io
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from research.errors import DataFormatError, ResearchError
from research.io import read_yaml_file, yaml_key_line


def config_files(args: list[str] | None) -> list[Path]:
    """The files given with ``--config X``, ``--config=X`` or ``-c X``."""
    files, args = [], list(args or [])
    for index, arg in enumerate(args):
        if arg in ("--config", "-c") and index + 1 < len(args):
            files.append(Path(args[index + 1]))
        elif arg.startswith("--config="):
            files.append(Path(arg.split("=", 1)[1]))
    return files


def check_config_files(args: list[str] | None) -> None:
    """Each ``--config`` file exists, is UTF-8 and is a YAML mapping; otherwise one error naming file and line."""
    for path in config_files(args):
        loaded = read_yaml_file(path, "config file")
        if loaded is None:
            raise DataFormatError(path, None, None, "empty config (expected a YAML mapping of options)")
        if not isinstance(loaded, dict):
            raise DataFormatError(path, 1, None, f"expected a YAML mapping of options, got a {type(loaded).__name__}")


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

