"""Helpers for bad-input tests: run a CLI entry point, check its one-line error, compare trees."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import stat
from collections.abc import Callable
from pathlib import Path


def tree_state(root: str | os.PathLike) -> dict[str, tuple]:
    """Every entry under `root` (itself included) -> (kind, content hash or link target, mode).

    Two equal states mean nothing was written, replaced, deleted or re-permissioned.
    """
    root = Path(root)
    state: dict[str, tuple] = {}
    if not os.path.lexists(root):
        return state
    todo = [root]
    while todo:
        path = todo.pop()
        info = os.lstat(path)
        rel = os.path.relpath(path, root)
        mode = stat.S_IMODE(info.st_mode)
        if stat.S_ISLNK(info.st_mode):
            state[rel] = ("link", os.readlink(path), mode)
        elif stat.S_ISDIR(info.st_mode):
            state[rel] = ("dir", None, mode)
            todo.extend(sorted(path.iterdir()))
        else:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            state[rel] = ("file", digest, mode)
    return state


def run_main(main: Callable[[list[str]], int], argv: list[str]) -> tuple[int, str, str]:
    """Call a CLI's `main(argv)` in-process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # a main that lets argparse exit
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def assert_user_error(code: int, stderr: str, expected_code: int = 2, match: str = "") -> None:
    """One `error: ...` line on stderr (containing `match`), the expected code, no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == expected_code, f"exit code {code}, expected {expected_code}; stderr: {stderr!r}"
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {stderr!r}"
    assert lines[0].startswith("error: "), lines[0]
    assert match.lower() in lines[0].lower(), f"{match!r} not in {lines[0]!r}"
