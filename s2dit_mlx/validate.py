"""Checks of values that come from users: text that must be UTF-8, config fields by annotation.

`check_field_types` reads a dataclass's field annotations, so every config class (ModelArgs,
the VAE and text-encoder configs, the training configs) checks its JSON values the same way and
names the field: `dit config: dim must be an integer, got '32'`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
from typing import Any

from .errors import S2DiTError


def utf8_problem(text: str) -> str | None:
    """Why `text` cannot be written as UTF-8 (lone surrogates), or None when it can.

    On Linux, argv bytes that are not UTF-8 arrive as surrogate escapes (U+DC80..U+DCFF);
    they name the original byte.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        code = ord(text[err.start])
        if 0xDC80 <= code <= 0xDCFF:
            return f"undecodable byte 0x{code - 0xDC00:02x} at character {err.start}"
        return f"lone surrogate U+{code:04X} at character {err.start}"
    return None


def check_text(text: str, what: str) -> None:
    """Raise S2DiTError unless `text` is a str that can be written as UTF-8."""
    if not isinstance(text, str):
        raise S2DiTError(f"{what} must be a string, got {type(text).__name__}")
    problem = utf8_problem(text)
    if problem:
        raise S2DiTError(f"{what} is not valid UTF-8 text ({problem}); give it as UTF-8")


# ----------------------------------------------------------------------------------------------
# Dataclass fields against their annotations

_NAMES = {
    int: ("an integer", "integers"),
    float: ("a finite number", "finite numbers"),
    bool: ("true or false", "booleans"),
    str: ("a string", "strings"),
    dict: ("a JSON object", "JSON objects"),
}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) is typing.Union or isinstance(tp, types.UnionType)


def _describe(tp: Any, plural: bool = False) -> str:
    """'an integer', 'a list of 3 integers', 'a string or null', ..."""
    if _is_union(tp):
        args = typing.get_args(tp)
        parts = [_describe(a, plural) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, tuple):
        fixed = origin is tuple and args and args[-1] is not Ellipsis
        inner = _describe(args[0], plural=True) if args else "values"
        count = f"{len(args)} " if fixed else ""
        return ("lists" if plural else "a list") + f" of {count}{inner}"
    names = _NAMES.get(origin or tp)
    if names is None:
        return "values" if plural else "a value"
    return names[1] if plural else names[0]


def _matches(value: Any, tp: Any) -> bool:
    if tp is Any:
        return True
    if _is_union(tp):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return (
            isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        )
    if tp is str:
        return isinstance(value, str)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, tuple):
        # JSON has no tuples: a list stands for either.
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(
                _matches(v, a) for v, a in zip(value, args, strict=True)
            )
        return not args or all(_matches(v, args[0]) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    return True  # a type this checker does not know: the class's own validate() decides


def check_field_types(config: Any, where: str) -> None:
    """Raise S2DiTError naming the first field of dataclass `config` that its value does not fit.

    ints are accepted for float fields (JSON writes 1.0 as 1); bools are not numbers here.
    """
    hints = _hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        tp = hints.get(f.name, Any)
        if not _matches(value, tp):
            raise S2DiTError(f"{where}: {f.name} must be {_describe(tp)}, got {value!r}")
