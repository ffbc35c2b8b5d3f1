"""The user-facing exception, and the wrapper that turns it into one line on stderr for CLIs."""

from __future__ import annotations

import sys
from collections.abc import Callable

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class S2DiTError(Exception):
    """A user-facing error: bad input, a bad model folder, an unwritable path."""


def _print_error(message: str) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)


def run_cli(body: Callable[[], int | None], interrupted: str = "interrupted") -> int:
    """Exit code of a CLI body: its own (None: 0), argparse's, or one `error: ...` line and 2.

    S2DiTError and OSError (a full disk, a permission) print one line and give 2; Ctrl-C
    prints `error: <interrupted>` and gives 130. Every entry point exits through here.
    """
    try:
        return body() or 0
    except SystemExit as exc:  # --help, usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except S2DiTError as exc:
        _print_error(str(exc))
        return EXIT_ERROR
    except OSError as exc:
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        _print_error(f"{exc.strerror or exc}{where}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        _print_error(interrupted)
        return EXIT_INTERRUPTED
