"""Atomic writes of whole folders: build beside the target, then rename into place."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp folder beside `target`; on success it replaces `target` atomically.

    On any exception the temp folder is removed and an existing `target` is left untouched,
    so readers never see a half-written folder. os.mkdir (unlike tempfile.mkdtemp) honours
    the umask, so the final folder gets the usual permissions.
    """
    target = Path(target).expanduser().absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            # Swap: old folder aside, new folder in, then drop the old one.
            old = target.with_name(f".{target.name}.{secrets.token_hex(4)}.old")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
