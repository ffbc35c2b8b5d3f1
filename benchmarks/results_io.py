"""What every benchmark does with its result: write it as JSON, atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_result(path: str | os.PathLike, result: dict) -> Path:
    """Write `result` to `path` as indented JSON through a temporary file; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    return out
