"""The argparse parser of every ``research`` command: no prefix matching, one-line errors with the nearest flag or
choice ("did you mean --top-k?"), and help that states each option's default."""

from __future__ import annotations

import argparse
import difflib
import re
from collections.abc import Iterable

from research.errors import ResearchError


class UsageError(ResearchError):
    """A command line argparse rejects: reported as one ``research: error: ...`` line, exit code 2."""


def nearest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to ``word`` (difflib), if any is close enough to be a likely typo."""
    found = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None


def nearest_flag(flag: str, options: Iterable[str]) -> str | None:
    """The option nearest to ``flag``, comparing a dotted flag's last part with its siblings' (``--trainer.max_step``
    -> ``--trainer.max_steps``), so that a long shared prefix does not make every sibling look close."""
    options = list(options)
    prefix, _, last = flag.rpartition(".")
    siblings = [o.rpartition(".")[2] for o in options if o.rpartition(".")[0] == prefix] if prefix else []
    if siblings:
        found = nearest(last, siblings)
        return f"{prefix}.{found}" if found else None
    return nearest(flag, options)


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """`` (did you mean X?)`` for the nearest candidate, or an empty string."""
    found = nearest(word, candidates)
    return f" (did you mean {found}?)" if found else ""


class DefaultsFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to each option's help unless the help already says its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.required or action.default is argparse.SUPPRESS
                or "default" in text.lower() or isinstance(action, argparse._HelpAction)):
            return text
        default = action.default
        shown = "off" if default is False else "none" if default is None else "%(default)s"
        return f"{text} (default: {shown})".strip()


class RawDefaultsFormatter(argparse.RawDescriptionHelpFormatter, DefaultsFormatter):
    """:class:`DefaultsFormatter` that keeps the description's own line breaks."""


class ResearchParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with ``allow_abbrev=False`` (``--top`` is not ``--top-k``), errors raised as one
    :class:`UsageError` line, and the defaults in ``--help``; its subcommand parsers are of the same class."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        formatter = kwargs.get("formatter_class", argparse.HelpFormatter)
        kwargs["formatter_class"] = RawDefaultsFormatter if issubclass(
            formatter, argparse.RawDescriptionHelpFormatter) else DefaultsFormatter
        super().__init__(*args, **kwargs)

    @property
    def command(self) -> str:
        """The subcommand path, e.g. ``zelo votes`` (empty for ``research`` itself)."""
        return self.prog.split(" ", 1)[1] if " " in self.prog else ""

    def error(self, message: str):
        if m := re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message):
            choices = [c.strip().strip("'") for c in m.group(2).split(",")]
            message = message.replace(m.group(0), f"invalid choice: '{m.group(1)}' (choose from {', '.join(choices)})")
            message += did_you_mean(m.group(1), choices)
        where = f"{self.command}: " if self.command else ""
        raise UsageError(f"{where}{message} (research {self.command + ' ' if self.command else ''}--help)")

    def option_strings(self) -> list[str]:
        return [s for action in self._actions for s in action.option_strings if s.startswith("--")]

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = self.innermost(namespace)
            flags = [e.split("=", 1)[0] for e in extras if e.startswith("-")]
            found = nearest_flag(flags[0], parser.option_strings()) if flags else None
            hint = f" (did you mean {found}?)" if found else ""
            parser.error(f"unrecognized argument{'s' if len(extras) > 1 else ''}: {' '.join(extras)}{hint}")
        return namespace

    def innermost(self, namespace: argparse.Namespace) -> ResearchParser:
        """The parser of the subcommand that ``namespace`` chose (``research zelo votes``: the ``votes`` parser)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = action.choices.get(getattr(namespace, action.dest, None) or "")
                if isinstance(chosen, ResearchParser):
                    return chosen.innermost(namespace)
        return self
