"""The argument parser every entry point uses, and argument types that check values up front.

Usage errors are one line `error: ... (see PROG --help)` on stderr with exit code 2, the same
for every `s2dit` command and their `python -m convert.wan` / `python -m train.*` aliases; a
bad number or an undecodable prompt is refused by the parser, before any model is loaded or
file written.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import math
from collections.abc import Iterator

from .errors import EXIT_ERROR
from .validate import utf8_problem


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions and epilogs as written; appends "(default: X)" to option help.

    Only where the help does not state a default already and the default is a value (not
    None, not a flag's False).
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            action.option_strings
            and not any(default is v for v in (None, False, argparse.SUPPRESS))
            and "default" not in text
            and "%(default)" not in text
        ):
            text += " (default: %(default)s)"
        return text


# prog a module's parser is written with -> the name the user invoked it by (see invoked_as)
_INVOKED_AS: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("invoked_as")


@contextlib.contextmanager
def invoked_as(module_prog: str, prog: str) -> Iterator[None]:
    """Inside this block, a Parser built with prog `module_prog` names itself `prog`.

    `s2dit train dit` runs train.dit's own parser and main, so its options, help and checks
    are written once; this makes its usage, help and errors say `s2dit train dit`.
    """
    token = _INVOKED_AS.set({**_INVOKED_AS.get({}), module_prog: prog})
    try:
        yield
    finally:
        _INVOKED_AS.reset(token)


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are one line on stderr, exit code 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.prog = _INVOKED_AS.get({}).get(self.prog, self.prog)

    def error(self, message: str):
        """Print `error: MESSAGE (see PROG --help)` and exit with code 2."""
        self.exit(EXIT_ERROR, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")


# ----------------------------------------------------------------------------------------------
# Argument types (argparse prefixes their messages with "argument --NAME: ")


def _number(raw: str, kind: type, ok, expected: str):
    try:
        value = kind(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {raw!r}") from None
    if (kind is float and not math.isfinite(value)) or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {raw!r}")
    return value


def positive_int(raw: str) -> int:
    """An integer >= 1."""
    return _number(raw, int, lambda v: v >= 1, "a positive integer")


def non_negative_int(raw: str) -> int:
    """An integer >= 0."""
    return _number(raw, int, lambda v: v >= 0, "an integer >= 0")


def positive_float(raw: str) -> float:
    """A finite number > 0."""
    return _number(raw, float, lambda v: v > 0, "a positive number")


def non_negative_float(raw: str) -> float:
    """A finite number >= 0."""
    return _number(raw, float, lambda v: v >= 0, "a finite number >= 0")


def probability(raw: str) -> float:
    """A number in [0, 1]."""
    return _number(raw, float, lambda v: 0 <= v <= 1, "a probability in [0, 1]")


def decay(raw: str) -> float:
    """A number in [0, 1) (an EMA decay, a dropout rate)."""
    return _number(raw, float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def text(value: str) -> str:
    """A string that can be written as UTF-8 (argv bytes that are not UTF-8 are refused)."""
    problem = utf8_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(f"not valid UTF-8 text ({problem}); give it as UTF-8")
    return value
