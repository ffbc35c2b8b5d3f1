"""The output rule every command follows, and atomic folder writes.

The rule (one place; generate, export, convert.wan, train.* and save_model all use it):

- A command writes only into paths it creates, or into a folder that is one of its own
  outputs: a folder carrying the project's marker `.s2dit` (JSON: kind, version, and for
  folders written whole the list of files written), or an output of an earlier version,
  recognised by its layout (`LEGACY` below). Nothing else is ever deleted or replaced.
- `--out` equal to, inside, or containing an input (a model folder, an adapter, a source
  checkpoint, a config file) is refused before any work (`check_inputs`).
- Whole-folder outputs (model folders, Core ML exports, adapters) are built in a hidden temp
  folder beside the target and swapped in with one atomic rename (`atomic_dir`): a reader, or
  a crash at any moment, sees the old folder or the complete new one. Replacing an existing
  folder needs it to be ours, of the same kind, and holding no file we did not write.
- Run folders (train.*) are written into, never replaced (`check_run_dir`, `mark_run_dir`).

A kill -9 can leave a hidden `.NAME.xxxxxxxx.tmp` (or `.old`) folder beside the target; the
next write to the same target removes those that carry our marker and whose writer is gone
(or puts back an `.old` whose swap was cut short), and leaves anything else alone.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import socket
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import S2DiTError

MARKER = ".s2dit"
MARKER_VERSION = 1

# kind -> what users call it
KINDS = {
    "model": "model folder",
    "coreml": "Core ML export",
    "adapter": "LoRA adapter folder",
    "vae": "VAE component folder",
    "run": "run folder",
}
# How outputs of earlier versions (no marker) are recognised, in words for error messages.
LEGACY = {
    "model": "config.json with model_type s2dit and only model-folder files",
    "coreml": "manifest.json with format s2dit-coreml",
    "adapter": "adapter_config.json with format s2dit-lora",
    "vae": "config.json with a type and model.safetensors",
    "run": "run.json or checkpoints/ (train.default_model: init/, latents.npz, ...)",
}

# Files of a model folder, top level and in its component folders (earlier versions).
_MODEL_TOP = re.compile(
    r"(config\.json|conversion_report\.json|model(-\d+-of-\d+)?\.safetensors"
    r"|model\.safetensors\.index\.json)"
)
_MODEL_SUB = re.compile(
    r"(vae|text_encoder|low_noise)/([\w.-]+\.json|model(-\d+-of-\d+)?\.safetensors|spiece\.model)"
)
_COREML_TOP = re.compile(r"(S2DiT\.mlpackage|VAEDecoder\.mlpackage|manifest\.json|[\w.-]+\.f16)")
# What train.default_model keeps in its run folder (users may seed it with latents.npz).
_RECIPE_TOP = {
    "latents.npz",
    "long_latents.npz",
    "latents.tmp.npz",
    "long_latents.tmp.npz",
    "tokenizer.json",
    "init",
    "vae_run",
    "dit",
    "palette",
    "model",
}


# ----------------------------------------------------------------------------------------------
# Markers


def read_marker(folder: str | os.PathLike) -> dict | None:
    """The marker of a folder we wrote (a dict with "kind"), or None."""
    path = Path(folder) / MARKER
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("kind") not in KINDS:
        return None
    return data


def write_marker(
    folder: str | os.PathLike, kind: str, in_place: bool = False, **extra: Any
) -> None:
    """Write `.s2dit` into folder, atomically (temp file + rename) unless `in_place`.

    In place is for folders users see: a write cut short leaves an unreadable marker, which
    counts as none (the folder's layout decides), never a stray temp file among theirs.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    data = {"kind": kind, "version": MARKER_VERSION, **extra}
    path = Path(folder) / MARKER
    if in_place:
        path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        return
    tmp = path.with_name(f"{MARKER}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _files(folder: Path) -> list[str]:
    """Every file and link under folder (relative, '/'-separated), the marker excluded."""
    out = []
    for root, dirs, files in os.walk(folder):
        rel = os.path.relpath(root, folder)
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = name if rel == "." else f"{rel}/{name}".replace(os.sep, "/")
            if path != MARKER:
                out.append(path)
    return sorted(out)


def _entries(folder: Path) -> list[Path]:
    """What a folder holds besides our marker."""
    return [p for p in folder.iterdir() if p.name != MARKER]


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _legacy_kind(folder: Path) -> tuple[str | None, list[str]]:
    """(kind, files that kind never holds) of an unmarked folder written by an earlier version.

    Recognised by its top-level files first, so a large folder of the user's is never walked.
    """
    top = {p.name for p in _entries(folder)}
    config = _read_json(folder / "config.json")
    if config is not None and config.get("model_type", "s2dit") == "s2dit" and "dit" in config:
        known = (_MODEL_TOP, _MODEL_SUB)
        return "model", [f for f in _files(folder) if not any(k.fullmatch(f) for k in known)]
    manifest = _read_json(folder / "manifest.json")
    if manifest is not None and manifest.get("format") == "s2dit-coreml":
        return "coreml", sorted(t for t in top if not _COREML_TOP.fullmatch(t))
    adapter = _read_json(folder / "adapter_config.json")
    if adapter is not None and adapter.get("format") == "s2dit-lora":
        known_files = {"adapter_config.json", "adapters.safetensors"}
        return "adapter", [f for f in _files(folder) if f not in known_files]
    if config is not None and isinstance(config.get("type"), str) and "model.safetensors" in top:
        vae_files = ("config.json", "model.safetensors")
        return "vae", [f for f in _files(folder) if f not in vae_files]
    if "run.json" in top or (folder / "checkpoints").is_dir() or (top and top <= _RECIPE_TOP):
        return "run", []
    return None, []


def folder_owner(folder: str | os.PathLike) -> tuple[str | None, list[str]]:
    """(kind, foreign files) of an existing folder: kind None when it is not ours.

    Foreign files are those the kind's writer did not write (user notes, ...): a folder that
    holds any is never replaced. Run folders are written into, not replaced, so they have none.
    """
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is None:
        return _legacy_kind(folder)
    listed = marker.get("files")
    if marker["kind"] == "run" or not isinstance(listed, list):
        return marker["kind"], []
    return marker["kind"], sorted(set(_files(folder)) - set(listed))


# ----------------------------------------------------------------------------------------------
# Checks before any work


def _chain(path: Path) -> list[tuple[int, int]]:
    """(st_dev, st_ino) of path (or its nearest existing ancestor) and of every ancestor."""
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    ids = []
    for p in (path, *path.parents):
        try:
            st = os.stat(p)
        except OSError:
            continue
        ids.append((st.st_dev, st.st_ino))
    return ids


def _same_or_under(child: Path, parent: Path) -> str | None:
    """'equal' or 'inside' when child is parent or lies under it (by inode: any case or link)."""
    try:
        st = os.stat(parent)
    except OSError:
        return None
    key = (st.st_dev, st.st_ino)
    chain = _chain(child)
    if key not in chain:
        return None
    exact = os.path.lexists(child) and chain[0] == key
    return "equal" if exact else "inside"


def check_inputs(
    out: str | os.PathLike,
    inputs: Iterable[tuple[str, str | os.PathLike | None]],
    flag: str = "--out",
) -> None:
    """Refuse an output path that is, lies inside, or contains one of the inputs.

    `inputs` are (what, path) pairs, e.g. ("model folder", "runs/a"); paths that do not exist
    locally (hub ids, None) are skipped. Compared by inode, so links and case do not hide it.
    """
    out = Path(os.path.expanduser(os.fspath(out)))
    for what, path in inputs:
        if path is None:
            continue
        path = Path(os.path.expanduser(os.fspath(path)))
        if not os.path.exists(path):
            continue
        where = _same_or_under(out, path)
        if where == "equal":
            raise S2DiTError(f"{flag} {out} is the input {what} {path}; choose another path")
        if where == "inside":
            raise S2DiTError(
                f"{flag} {out} is inside the input {what} {path}; choose a path outside it"
            )
        if os.path.isdir(out) and _same_or_under(path, out) == "inside":
            raise S2DiTError(
                f"{flag} {out} contains the input {what} {path}; choose a path that holds no input"
            )


def _what(path: Path, flag: str | None) -> str:
    return f"{flag} {path}" if flag else f"output folder {path}"


def _refusal(path: Path, kind: str, flag: str | None) -> str | None:
    """Why `path` may not be replaced by a new `kind` folder (None: it may)."""
    what = _what(path, flag)
    if os.path.islink(path):
        return f"{what} is a symbolic link; give the folder itself"
    if not os.path.lexists(path):
        return None
    if not path.is_dir():
        return f"{what} is a file; s2dit-mlx writes a folder there and never replaces files"
    try:
        if not _entries(path):
            return None
        owner, foreign = folder_owner(path)
    except OSError as err:
        return f"{what} cannot be read ({err.strerror or err})"
    desc = KINDS[kind]
    if owner is None:
        return (
            f"{what} is not empty and is not an s2dit-mlx {desc} (those carry a {MARKER} "
            f"marker; earlier versions' have {LEGACY[kind]}); choose a new or empty folder"
        )
    if owner != kind:
        return f"{what} is an s2dit-mlx {KINDS[owner]}, not a {desc}; choose another folder"
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        return (
            f"{what} holds {foreign[0]}{more}, which s2dit-mlx did not write; move it away or "
            "choose another folder"
        )
    return None


def check_output_dir(
    out: str | os.PathLike,
    kind: str,
    *,
    inputs: Iterable[tuple[str, str | os.PathLike | None]] = (),
    overwrite: bool = False,
    flag: str | None = "--out",
) -> Path:
    """Check, before any work, that a command may write the `kind` folder `out`; returns it.

    A new path or an empty folder is fine. An existing folder is replaced only if it is an
    s2dit-mlx output of this kind with no foreign files, and only with `overwrite`.
    """
    if not os.fspath(out).strip():
        raise S2DiTError(f"{flag or 'output path'} is empty")
    path = Path(os.path.expanduser(os.fspath(out)))
    check_inputs(path, inputs, flag or "output folder")
    why = _refusal(path, kind, flag)
    if why:
        raise S2DiTError(why)
    if path.is_dir() and _entries(path) and not overwrite:
        raise S2DiTError(
            f"{_what(path, flag)} already holds an s2dit-mlx {KINDS[kind]}; pass --overwrite "
            "to replace it, or choose another folder"
        )
    _check_parent(path, flag)
    return path


def _check_parent(path: Path, flag: str | None) -> None:
    parent = Path(os.path.abspath(path)).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise S2DiTError(f"{_what(path, flag)}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise S2DiTError(f"{_what(path, flag)}: {parent} is not writable")


def check_run_dir(
    out: str | os.PathLike,
    *,
    inputs: Iterable[tuple[str, str | os.PathLike | None]] = (),
    flag: str = "--out",
) -> Path:
    """Check, before any work, that a training run may write into folder `out`; returns it.

    Fine: a new path, an empty folder, or one of our run folders (marker, or from earlier
    versions run.json / checkpoints/ / train.default_model's files). Anything else is refused.
    """
    if not os.fspath(out).strip():
        raise S2DiTError(f"{flag} is empty")
    path = Path(os.path.expanduser(os.fspath(out)))
    check_inputs(path, inputs, flag)
    if os.path.lexists(path):
        if not path.is_dir():
            raise S2DiTError(f"{flag} {path} is a file; give a folder for the run")
        try:
            owner = folder_owner(path)[0] if _entries(path) else "run"
        except OSError as err:
            raise S2DiTError(f"{flag} {path} cannot be read ({err.strerror or err})") from None
        if owner != "run":
            raise S2DiTError(
                f"{flag} {path} is not empty and is not an s2dit-mlx run folder (those carry "
                f"a {MARKER} marker; earlier versions' have {LEGACY['run']}); choose a new "
                "or empty folder"
            )
    _check_parent(path, flag)
    return path


def mark_run_dir(out: str | os.PathLike, command: str) -> Path:
    """Create the run folder (if needed) and mark it as ours; call once the checks passed."""
    path = Path(os.path.expanduser(os.fspath(out)))
    path.mkdir(parents=True, exist_ok=True)
    if read_marker(path) is None:
        write_marker(path, "run", in_place=True, command=command)
    return path


def check_output_file(
    path: str | os.PathLike, ours: Callable[[Path], bool], what: str, hint: str
) -> None:
    """Refuse to replace an existing file at `path` unless `ours(path)` says we wrote it."""
    path = Path(path)
    if os.path.islink(path) or (os.path.lexists(path) and not path.is_file()):
        raise S2DiTError(f"{what} {path} exists and is not a plain file; {hint}")
    if path.is_file() and not ours(path):
        raise S2DiTError(f"{what} {path} exists and was not written by s2dit-mlx; {hint}")


# ----------------------------------------------------------------------------------------------
# Atomic folder writes


def _temp_pattern(target: Path) -> re.Pattern:
    return re.compile(rf"\.{re.escape(target.name)}\.[0-9a-f]{{8}}\.(tmp|old)")


def _writer_alive(marker: dict) -> bool:
    pid, host = marker.get("pid"), marker.get("host")
    if not isinstance(pid, int) or host != socket.gethostname():
        return isinstance(pid, int)  # another machine's writer: leave it alone
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _remove_marked(folder: Path) -> None:
    """Delete a folder of ours, the marker last (so a cut-short delete stays recognisable)."""
    for child in folder.iterdir():
        if child.name == MARKER:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    (folder / MARKER).unlink(missing_ok=True)
    folder.rmdir()


def clean_stale_temps(target: str | os.PathLike) -> None:
    """Tidy what a killed writer of `target` left beside it (see the module docstring).

    Only hidden `.NAME.xxxxxxxx.tmp|old` folders are considered: empty ones are removed, marked
    ones whose writer is gone are removed (an `.old` is put back if `target` is missing: its
    swap was cut short), and anything unmarked is left alone.
    """
    target = Path(os.path.abspath(os.path.expanduser(os.fspath(target))))
    parent = target.parent
    if not parent.is_dir():
        return
    pattern = _temp_pattern(target)
    for entry in sorted(parent.iterdir()):
        if not pattern.fullmatch(entry.name) or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            if not any(entry.iterdir()):
                entry.rmdir()
                continue
            marker = read_marker(entry)
            if marker is None or _writer_alive(marker):
                continue
            if entry.name.endswith(".old") and not os.path.lexists(target):
                os.rename(entry, target)
                continue
            _remove_marked(entry)
        except OSError:
            continue  # someone else is tidying it, or it is not ours to touch


_libc_handle: Any = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the system cannot."""
    global _libc_handle
    try:
        if _libc_handle is None:
            _libc_handle = ctypes.CDLL(None, use_errno=True)
        libc = _libc_handle
        if sys.platform == "darwin":
            fn = libc.renamex_np  # RENAME_SWAP = 0x2 (macOS 10.12+)
            fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
            rc = fn(os.fsencode(a), os.fsencode(b), 0x2)
        elif sys.platform.startswith("linux"):
            fn = libc.renameat2  # RENAME_EXCHANGE = 2 (Linux 3.15+, glibc 2.28+)
            fn.argtypes = [
                ctypes.c_int,
                ctypes.c_char_p,
                ctypes.c_int,
                ctypes.c_char_p,
                ctypes.c_uint,
            ]
            at_fdcwd = -100
            rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), 2)
        else:
            return False
    except (AttributeError, OSError):
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False  # the file system cannot swap: fall back to two renames
    raise OSError(err, os.strerror(err), os.fspath(b))


def _swap_in(tmp: Path, target: Path, kind: str) -> None:
    """Put the finished folder `tmp` at `target`, atomically; the old target is deleted."""
    if not os.path.lexists(target) or not any(target.iterdir()):
        os.rename(tmp, target)  # replaces an empty folder; refuses one that filled meanwhile
        return
    if read_marker(target) is None:
        try:  # an earlier version's folder: mark it, so a cut-short delete is recognisable
            write_marker(target, kind, in_place=True, files=_files(target))
        except OSError:
            pass
    if _exchange(tmp, target):
        trash = tmp  # now holding the old folder
    else:
        # Two renames; a crash between them leaves `.old`, which the next writer puts back.
        old = tmp.with_name(f".{target.name}.{secrets.token_hex(4)}.old")
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)
            raise
        trash = tmp.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        os.rename(old, trash)
    try:
        _remove_marked(trash)
    except OSError:
        pass  # the new folder is in place; the next writer tidies the rest


@contextmanager
def atomic_dir(target: str | os.PathLike, kind: str) -> Iterator[Path]:
    """Yield a temp folder beside `target`; on success it replaces `target` atomically.

    `target` must be new, an empty folder, or an output of ours of the same `kind` without
    foreign files (S2DiTError otherwise, checked before and again at the swap). The result
    carries the marker with the list of files written. On any exception the temp folder (and
    any parent folder this call created) is removed and `target` is left untouched.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    target = Path(os.path.abspath(os.path.expanduser(os.fspath(target))))
    why = _refusal(target, kind, None)
    if why:
        raise S2DiTError(why)
    created = []
    parent = target.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(target)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.mkdir()
        write_marker(tmp, kind, pid=os.getpid(), host=socket.gethostname())
        yield tmp
        write_marker(tmp, kind, files=_files(tmp))
        why = _refusal(target, kind, None)  # it may have changed while we worked
        if why:
            raise S2DiTError(why)
        _swap_in(tmp, target, kind)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                break
        raise
