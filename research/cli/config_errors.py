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


def locate_key(path: Path, field: str) -> tuple[int, str] | None:
    """Where ``field`` (jsonargparse's name, which drops ``init_args``) is in the YAML file: the line of its last part
    and the key path as the file spells it (``model.init_args.temprature``); None unless every part is found."""
    import yaml

    try:
        node = yaml.compose(path.read_text(encoding="utf-8-sig"), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    spelled: list[str] = []
    line = None
    for part in (p for p in field.split(".") if p and p not in ("init_args", "dict_kwargs")):
        found, via = _child(node, part), None
        for wrapper in ("init_args", "dict_kwargs"):
            if found is None and (holder := _child(node, wrapper)) is not None:
                found, via = _child(holder[1], part), wrapper
        if found is None:
            return None
        spelled += [via, part] if via else [part]
        line, node = found[0].start_mark.line + 1, found[1]
    return (line, ".".join(spelled)) if line is not None else None


def typo_hint(field: str, args: list[str] | None) -> str:
    """`` (did you mean loss?)`` for the first part of ``field`` that its level does not accept: the ``__init__``
    parameters of the ``class_path`` the configs (or the command line) give that level, or the Trainer's."""
    from research.cli.parser import did_you_mean

    parts = [p for p in field.split(".") if p and p not in ("init_args", "dict_kwargs")]
    for index, part in enumerate(parts):
        owner = ".".join(parts[:index])
        names = _parameters("lightning.Trainer") if owner == "trainer" else \
            _parameters(_class_path_of(args, owner)) if owner else []
        if names and part not in names:
            return did_you_mean(part, names)
    return ""


def _class_path_of(args: list[str] | None, key: str) -> str:
    """The ``class_path`` that ``--KEY.class_path`` or the last config file giving one sets for ``key``."""
    import yaml

    args = list(args or [])
    for index, arg in enumerate(args):
        if arg == f"--{key}.class_path" and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(f"--{key}.class_path="):
            return arg.split("=", 1)[1]
    for path in reversed(config_files(args)):
        try:
            node = yaml.compose(path.read_text(encoding="utf-8-sig"), Loader=yaml.SafeLoader)
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        for part in key.split("."):
            found = _child(node, part)
            for wrapper in ("init_args", "dict_kwargs"):
                if found is None and (holder := _child(node, wrapper)) is not None:
                    found = _child(holder[1], part)
            node = found[1] if found is not None else None
        if (class_path := _child(node, "class_path")) is not None:
            return str(class_path[1].value)
    return ""


def _child(node, name: str):
    import yaml

    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if key.value == name:
                return key, value
    return None


def _parameters(class_path: str) -> list[str]:
    """The keyword parameters of ``class_path``'s ``__init__`` (empty when it does not import)."""
    import importlib
    import inspect

    module, _, name = class_path.rpartition(".")
    try:
        target = getattr(importlib.import_module(module), name)
        parameters = inspect.signature(target.__init__).parameters.values()
    except (ImportError, AttributeError, ValueError, TypeError):
        return []
    return [p.name for p in parameters if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


@contextlib.contextmanager
def one_line_config_errors(args: list[str] | None, options: list[str] = ()) -> Iterator[None]:
    """Check the config files, then turn a jsonargparse parse failure (usage text, exit 2) into one
    :class:`DataFormatError` naming the config file, the line and the field (``--help`` passes through).
    ``options``: the command's flags, for "did you mean" on an unknown one."""
    from research.cli.parser import nearest_flag

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
        flags = [arg.lstrip("-").split("=", 1)[0] for arg in args or [] if arg.startswith("--")]
        if field is not None and (m := re.search(r"unrecognized arguments: --([^\s=]+)", reason)):
            # a nested class's parser rejected its part of a command-line flag: name the whole flag
            whole = {f"{field}.{m.group(1)}", f"{field}.init_args.{m.group(1)}"}
            if (given := next((flag for flag in flags if flag in whole), None)) is not None:
                field, reason = given, "is not an accepted option"
        given = next((flag for flag in flags if field is not None and flag.replace(".init_args.", ".")
                      == field.replace(".init_args.", ".")), None)
        if field is None:
            if (m := re.match(r"unrecognized arguments: (--[^\s=]+)", reason)):
                found = nearest_flag(m.group(1), options)
                reason += f" (did you mean {found}?)" if found else ""
            raise ResearchError(reason) from None
        unknown = "not an accepted option" in reason
        if given is not None:
            prefix = given.rpartition(".")[0]
            known = [o for o in options if o.rpartition(".")[0] == f"--{prefix}" and not o.endswith(".help")]
            known += [f"--{prefix}.{p}" for p in _parameters(_class_path_of(args, prefix.removesuffix(".init_args")))]
            found = nearest_flag(f"--{given}", known) if unknown else None
            hint = f" (did you mean {found}?)" if found else typo_hint(given, args) if unknown else ""
            raise ResearchError(f"--{given}: {reason}{hint}") from None
        for path in reversed(config_files(args)):  # later files override earlier ones
            if (found := locate_key(path, field)) is not None:
                line, spelled = found
                raise DataFormatError(path, line, spelled, reason + (typo_hint(field, args) if unknown else "")) from None
        for path in reversed(config_files(args)):
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

