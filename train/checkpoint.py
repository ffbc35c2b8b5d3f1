"""Atomic, resumable training checkpoints.

Layout of a run folder:

    RUN_DIR/checkpoints/step-0000100/   one folder per checkpoint
        model.safetensors               trainable weights of the trained tree (float32
                                        masters; earlier versions wrote the model's dtype,
                                        which the trainer casts on resume)
        optimizer.safetensors           optimizer state (tree_flatten names), float32
        ema.safetensors                 EMA of the trainable weights (when EMA is on)
        trainer_state.json              step, seed, data position, loss history, config
    RUN_DIR/checkpoints/latest          text file naming the newest complete folder

A checkpoint is written into a hidden temporary folder, every file is fsync'ed, then the
folder is renamed into place and only then is `latest` replaced (itself via a temporary file
and os.replace). A crash at any moment leaves either the previous checkpoint as `latest` or
the new one, never a half-written one; stale temporary folders are ignored and cleaned up.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx

from s2dit_mlx.errors import S2DiTError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_NAME = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    """Folder name of the checkpoint taken after `step` optimizer steps."""
    return f"step-{step:07d}"


def _fsync_dir(path: Path) -> None:
    # Directory fsync makes the rename itself durable; not every platform allows it.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_arrays(path: Path, arrays: dict[str, mx.array]) -> None:
    """Write a flat dict of arrays as safetensors and fsync it."""
    mx.save_safetensors(str(path), arrays, metadata={"format": "mlx"})
    _fsync_file(path)


def write_json(path: Path, data: Any) -> None:
    """Write JSON and fsync it."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def replace_text(path: Path, text: str) -> None:
    """Atomically replace a small text file (temporary file + fsync + os.replace)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    arrays: dict[str, dict[str, mx.array]],
    state: dict,
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` atomically; `arrays` maps file stem -> flat weights dict.

    Keeps the newest `keep` checkpoints (0 keeps all). Returns the checkpoint folder.
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        for stem, weights in arrays.items():
            write_arrays(tmp / f"{stem}.safetensors", weights)
        # Written last: a folder holding trainer_state.json is complete.
        write_json(tmp / STATE_NAME, state)
        _fsync_dir(tmp)
        if final.exists():
            old = root / f".old-{final.name}-{secrets.token_hex(4)}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_text(root / LATEST, final.name + "\n")
    if keep > 0:
        _prune(root, keep, final.name)
    return final


def _remove_stale_temps(root: Path) -> None:
    for p in root.iterdir():
        if p.name.startswith((".tmp-", ".old-")) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _complete_steps(root: Path) -> list[tuple[int, Path]]:
    out = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / STATE_NAME).is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def _prune(root: Path, keep: int, current: str) -> None:
    done = _complete_steps(root)
    for _, p in done[: max(0, len(done) - keep)]:
        if p.name != current:
            shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run (following `latest`), or None if there is none."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        if _STEP_DIR.match(name) and (root / name / STATE_NAME).is_file():
            return root / name
    # No pointer (or it names a folder that is gone): fall back to the newest complete folder.
    done = _complete_steps(root)
    return done[-1][1] if done else None


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, dict[str, mx.array]], dict]:
    """Read a checkpoint folder -> ({file stem: weights}, trainer state); S2DiTError if broken."""
    path = Path(path)
    where = f"checkpoint {path}"
    if not path.is_dir():
        raise S2DiTError(f"{where} does not exist")
    state_file = path / STATE_NAME
    if not state_file.is_file():
        raise S2DiTError(f"{where} is incomplete ({STATE_NAME} is missing)")
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise S2DiTError(f"{where}: {STATE_NAME} is unreadable ({type(err).__name__})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise S2DiTError(f"{where}: {STATE_NAME} has no integer 'step'")
    arrays = {}
    for file in sorted(path.glob("*.safetensors")):
        try:
            arrays[file.stem] = mx.load(str(file), format="safetensors")
        except Exception as err:  # mlx raises RuntimeError/ValueError on corrupt files
            msg = " ".join(str(err).split()) or type(err).__name__
            raise S2DiTError(
                f"{where}: {file.name} is not a readable safetensors file ({msg})"
            ) from None
    return arrays, state


def check_weights(got: dict[str, mx.array], expected: dict[str, mx.array], where: str) -> None:
    """Raise S2DiTError naming the first missing, unexpected or mis-shaped weight."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing:
        raise S2DiTError(
            f"{where} does not match the model: weight {missing[0]} is missing "
            f"({len(missing)} missing in all)"
        )
    if unexpected:
        raise S2DiTError(
            f"{where} does not match the model: unexpected weight {unexpected[0]} "
            f"({len(unexpected)} unexpected in all)"
        )
    for name in sorted(expected):
        if tuple(got[name].shape) != tuple(expected[name].shape):
            raise S2DiTError(
                f"{where} does not match the model: weight {name} has shape "
                f"{tuple(got[name].shape)}, the model has {tuple(expected[name].shape)}"
            )
