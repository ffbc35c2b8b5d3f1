"""The user-facing exception, and the wrapper that turns it into one line on stderr for CLIs."""

from __future__ import annotations

import sys
from collections.abc import Callable

EXIT_ERROR = 2


class S2DiTError(Exception):
    """A user-facing error: bad input, a bad model folder, an unwritable path."""


def run_cli(body: Callable[[], int | None]) -> int:
    """Exit code of a CLI body: its own (None: 0), argparse's, or 2 after an S2DiTError's line."""
    try:
        return body() or 0
    except SystemExit as exc:  # --help, usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except S2DiTError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_ERROR
