"""Write and read generated videos: .mp4, .gif and PNG frames, every write atomic.

Output kinds, chosen by the output path (suffixes are case-insensitive):

- ``out.mp4``: H.264 (libx264, yuv420p, CRF 18) through the ffmpeg that imageio-ffmpeg ships.
- ``out.gif``: animated GIF that loops forever (Pillow, one adaptive palette per frame).
- ``frames/`` (a trailing slash, or any path without a suffix): a directory of PNG frames
  ``00000.png``, ``00001.png``, ...  It must not exist yet or be empty.
- ``frames/f_%05d.png`` (a ``.png`` path with a printf-style ``%d`` placeholder): one PNG per
  frame, named by the pattern, in an existing directory.
- ``still.png`` (a ``.png`` path without a placeholder): a single frame.

Atomicity: data goes to hidden temporary names in the destination directory and is moved into
place with ``os.replace`` only when the writer closes cleanly. If anything fails, or an exception
escapes the ``with`` block, the temporaries are removed and nothing appears at the output path.

Metadata sidecar: ``write_metadata(output, meta)`` writes JSON beside the output with the suffix
replaced by ``.json``: ``out.mp4`` -> ``out.json``, ``frames/`` -> ``frames.json``,
``frames/f_%05d.png`` -> ``frames/f.json``. The user never names that file, so it replaces only
a sidecar s2dit wrote (``"s2dit_sidecar"`` key, or the fields earlier versions wrote);
``check_sidecar`` says so before any work.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .errors import S2DiTError
from .fsutil import check_output_file

VIDEO_SUFFIXES = (".mp4", ".gif", ".png")
_PLACEHOLDER = re.compile(r"%0?(\d*)d")
_MP4_CRF = 18
SIDECAR_KEY = "s2dit_sidecar"  # first key of every sidecar; its value is the format version
SIDECAR_VERSION = 1


def _expand(path: str | os.PathLike) -> str:
    return os.path.expanduser(os.fspath(path))


def output_kind(path: str | os.PathLike) -> str:
    """The writer kind for a path: "mp4", "gif", "png" (single), "png-pattern" or "png-dir"."""
    raw = _expand(path)
    if raw.endswith(("/", os.sep)):
        return "png-dir"
    suffix = Path(raw).suffix.lower()
    if suffix == "":
        return "png-dir"
    if suffix == ".png":
        return "png-pattern" if _PLACEHOLDER.search(Path(raw).name) else "png"
    if suffix in (".mp4", ".gif"):
        return suffix[1:]
    raise S2DiTError(
        f"unsupported output suffix '{Path(raw).suffix}' in {raw} "
        "(use .mp4, .gif, .png, or a directory like frames/ for PNG frames)"
    )


def check_output_path(path: str | os.PathLike) -> Path:
    """Validate an output path before any work is done; return it (with ~ expanded)."""
    raw = _expand(path) if path is not None else ""
    if not raw.strip():
        raise S2DiTError("output path is empty")
    if raw.strip() == "-":
        raise S2DiTError("writing the video to standard output (-) is not supported; give a path")
    kind = output_kind(raw)
    out = Path(raw)
    if kind == "png-pattern" and len(_PLACEHOLDER.findall(out.name)) != 1:
        raise S2DiTError(f"PNG pattern needs exactly one %d placeholder: {raw}")
    if kind == "png-pattern" and _PLACEHOLDER.search(str(out.parent)):
        raise S2DiTError(f"the %d placeholder must be in the file name, not the folder: {raw}")
    if kind == "png-dir":
        if out.exists() and not out.is_dir():
            raise S2DiTError(f"output path for PNG frames exists and is not a directory: {raw}")
        if out.is_dir() and any(out.iterdir()):
            raise S2DiTError(f"output directory for PNG frames is not empty: {raw}")
    elif out.is_dir():
        raise S2DiTError(
            f"output path is a directory, expected a file name like {out / 'video.mp4'}"
        )
    parent = out.absolute().parent
    if not parent.exists():
        raise S2DiTError(f"output directory does not exist: {parent}")
    if not parent.is_dir():
        raise S2DiTError(f"output directory is not a directory: {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise S2DiTError(f"output directory is not writable: {parent}")
    return out


def check_frame_count(path: str | os.PathLike, num_frames: int) -> None:
    """Refuse more than one frame for a single-.png output (once the frame count is known)."""
    if num_frames > 1 and output_kind(path) == "png":
        raise S2DiTError(
            f"{_expand(path)} holds one frame but {num_frames} were asked for "
            "(use .mp4, .gif, a directory like frames/, or a pattern like frames/%05d.png)"
        )


def to_uint8(frames: mx.array | np.ndarray) -> np.ndarray:
    """Map frames in [-1, 1] (any float dtype) to uint8 [0, 255], rounding and clipping."""
    if isinstance(frames, mx.array):
        frames = np.array(frames.astype(mx.float32))  # numpy has no bfloat16
    x = np.nan_to_num(np.asarray(frames, dtype=np.float32), nan=0.0)
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _temp_name(final: Path, suffix: str = "") -> Path:
    # Hidden, unique, in the destination directory so os.replace is a same-filesystem rename.
    return final.with_name(f".{final.name.rstrip('/')}.{secrets.token_hex(4)}.tmp{suffix}")


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


class VideoWriter:
    """Atomic, incremental video writer; the format follows the output path (module docstring).

    Use as a context manager and call ``write`` with uint8 frames [F, H, W, 3] (or one frame
    [H, W, 3]) as they become available; all frames must share one size.
    """

    def __init__(self, path: str | os.PathLike, fps: float = 16.0, crf: int = _MP4_CRF):
        self.path = check_output_path(path)
        self.kind = output_kind(path)
        if fps <= 0:
            raise S2DiTError(f"fps must be positive, got {fps}")
        self.fps = float(fps)
        self.crf = int(crf)
        self.frames_written = 0
        self.closed = False
        self._size: tuple[int, int] | None = None  # (height, width)
        self._temps: list[Path] = []  # everything to clean up on failure
        self._moves: list[tuple[Path, Path]] = []  # (temporary, final) renames done on close
        self._proc: subprocess.Popen | None = None
        self._stderr: Any = None
        self._gif_frames: list = []
        self._dir: Path | None = None

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- writing ---------------------------------------------------------------------------
    def write(self, frames: np.ndarray) -> None:
        """Append uint8 RGB frames [F, H, W, 3] (or a single [H, W, 3] frame)."""
        if self.closed:
            raise S2DiTError("cannot write to a closed VideoWriter")
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise S2DiTError(
                f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {list(frames.shape)}"
            )
        size = (int(frames.shape[1]), int(frames.shape[2]))
        if self._size is None:
            self._start(size)
        elif size != self._size:
            raise S2DiTError(f"frame size changed from {self._size} to {size} mid-video")
        try:
            for frame in frames:
                self._write_frame(np.ascontiguousarray(frame))
                self.frames_written += 1
        except BaseException:
            self.abort()
            raise

    def _start(self, size: tuple[int, int]) -> None:
        h, w = size
        if self.kind == "mp4" and (h % 2 or w % 2):
            raise S2DiTError(f"mp4 (yuv420p) needs even frame sizes, got {h}x{w}")
        self._size = size
        if self.kind == "png-dir":
            # Frames go into a hidden sibling directory that is renamed into place on close.
            self._dir = _temp_name(self.path)
            os.mkdir(self._dir)
            self._temps.append(self._dir)
            self._moves.append((self._dir, self.path))
        if self.kind != "mp4":
            return
        import imageio_ffmpeg  # only mp4 needs the ffmpeg binary

        tmp = _temp_name(self.path, ".mp4")
        self._temps.append(tmp)
        self._moves.append((tmp, self.path))
        cmd = [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-y", "-hide_banner", "-loglevel", "error",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", f"{self.fps:g}",
            "-i", "-", "-an",
            "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", str(self.crf), "-preset", "medium",
            "-movflags", "+faststart", "-f", "mp4", str(tmp),
        ]  # fmt: skip
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._stderr
        )

    def _write_frame(self, frame: np.ndarray) -> None:
        from PIL import Image

        if self.kind == "mp4":
            try:
                self._proc.stdin.write(frame.tobytes())
            except (BrokenPipeError, OSError) as err:
                raise S2DiTError(
                    f"ffmpeg stopped while writing {self.path}: {self._ffmpeg_error()}"
                ) from err
        elif self.kind == "gif":
            # Palettize now: keeps 1 byte per pixel in memory until the GIF is saved on close.
            self._gif_frames.append(
                Image.fromarray(frame).convert("P", palette=Image.Palette.ADAPTIVE)
            )
        elif self.kind == "png" and self.frames_written >= 1:
            raise S2DiTError(
                f"{self.path} holds one frame; use a directory or a pattern like frames/%05d.png"
            )
        else:
            if self.kind == "png-dir":
                final = self._dir / f"{self.frames_written:05d}.png"
                tmp = final
            else:
                n = self.frames_written
                name = _PLACEHOLDER.sub(lambda m: f"{n:0{m.group(1) or 1}d}", self.path.name)
                final = self.path.with_name(name)
                tmp = _temp_name(final, ".png")
                self._temps.append(tmp)
                self._moves.append((tmp, final))
            Image.fromarray(frame).save(tmp, format="PNG")

    def _ffmpeg_error(self) -> str:
        if self._stderr is None:
            return "no output"
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace").strip()
        return text.splitlines()[-1] if text else f"exit code {self._proc.poll()}"

    # -- finishing -------------------------------------------------------------------------
    def close(self) -> None:
        """Finish encoding and move the result into place atomically."""
        if self.closed:
            return
        try:
            if self.frames_written == 0:
                raise S2DiTError(f"no frames were written to {self.path}")
            if self.kind == "mp4":
                self._proc.stdin.close()
                if self._proc.wait() != 0:
                    raise S2DiTError(f"ffmpeg failed writing {self.path}: {self._ffmpeg_error()}")
            elif self.kind == "gif":
                tmp = _temp_name(self.path, ".gif")
                self._temps.append(tmp)
                self._moves.append((tmp, self.path))
                first, rest = self._gif_frames[0], self._gif_frames[1:]
                # GIF stores delays in 1/100 s; Pillow takes milliseconds. loop=0: forever.
                duration = max(10, int(round(100.0 / self.fps)) * 10)
                first.save(
                    tmp, format="GIF", save_all=True, append_images=rest, duration=duration, loop=0
                )
                self._gif_frames = []
            for tmp, final in self._moves:
                os.replace(tmp, final)
        except BaseException:
            self.abort()
            raise
        self._cleanup_process()
        self.closed = True

    def abort(self) -> None:
        """Stop writing and remove every temporary file; the output path is left untouched."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._cleanup_process()
        for tmp in self._temps:
            _remove(tmp)
        self._gif_frames = []
        self.closed = True

    def _cleanup_process(self) -> None:
        if self._proc is not None and self._proc.stdin and not self._proc.stdin.closed:
            try:
                self._proc.stdin.close()
            except OSError:
                pass
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = 16.0) -> Path:
    """Write all frames at once (uint8 [F, H, W, 3]) and return the output path."""
    with VideoWriter(path, fps=fps) as writer:
        writer.write(frames)
    return writer.path


def metadata_path(output: str | os.PathLike) -> Path:
    """The JSON sidecar path for an output (see the module docstring)."""
    raw = _expand(output)
    kind = output_kind(raw)
    out = Path(raw)
    if kind == "png-dir":
        return out.with_name(out.name + ".json")
    if kind == "png-pattern":
        stem = _PLACEHOLDER.sub("", out.stem).strip("_-. ") or "frames"
        return out.with_name(stem + ".json")
    return out.with_suffix(".json")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def is_sidecar(path: str | os.PathLike) -> bool:
    """Whether the JSON file at path is a sidecar s2dit wrote (this or an earlier version)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    if not isinstance(data, dict):
        return False
    if SIDECAR_KEY in data:
        return True
    # Earlier versions: `s2dit generate`'s fields, with our version stamp.
    versions = data.get("versions")
    return {"prompt", "seed", "settings"} <= data.keys() and (
        isinstance(versions, dict) and "s2dit_mlx" in versions
    )


def check_sidecar(output: str | os.PathLike) -> Path:
    """Refuse an output whose sidecar path holds a file s2dit did not write; returns that path."""
    target = metadata_path(output)
    check_output_file(
        target,
        is_sidecar,
        "the metadata sidecar",
        "move it away or choose another output name",
    )
    return target


def _any_default(obj: Any) -> Any:
    try:
        return _json_default(obj)
    except TypeError:
        return repr(obj)  # a record of it beats no sidecar


def metadata_json(meta: dict) -> str:
    """``meta`` as JSON text that always encodes as UTF-8 (it cannot fail on content).

    Readable text stays as it is; a string that is not valid Unicode (a file name with
    non-UTF-8 bytes, a lone surrogate) makes the whole record ASCII with \\u escapes, which
    json.load reads back to the same strings.
    """
    text = json.dumps(meta, indent=2, ensure_ascii=False, default=_any_default) + "\n"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(meta, indent=2, ensure_ascii=True, default=_any_default) + "\n"
    return text


def write_metadata(output: str | os.PathLike, meta: dict) -> Path:
    """Atomically write ``meta`` as JSON beside ``output``; return the sidecar path.

    Raises S2DiTError if that path holds a file s2dit did not write (``check_sidecar``).
    """
    target = check_sidecar(output)
    meta = {SIDECAR_KEY: SIDECAR_VERSION, **{k: v for k, v in meta.items() if k != SIDECAR_KEY}}
    text = metadata_json(meta)
    tmp = _temp_name(target)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise
    return target


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Read an .mp4, .gif, .png, PNG pattern or PNG directory into uint8 [F, H, W, 3]."""
    from PIL import Image, ImageSequence

    raw = _expand(path)
    kind = output_kind(raw)
    p = Path(raw)
    if kind == "png-pattern":
        regex = re.compile(
            "".join(r"\d+" if part is None else re.escape(part) for part in _split_pattern(p.name))
            + r"\Z"
        )
        files = (
            sorted(f for f in p.parent.iterdir() if regex.match(f.name))
            if p.parent.is_dir()
            else []
        )
    elif kind == "png-dir":
        files = sorted(p.glob("*.png")) if p.is_dir() else []
    else:
        files = [p] if p.is_file() else []
    if not files:
        raise S2DiTError(f"no video found at {raw}")
    if kind == "mp4":
        import imageio_ffmpeg

        gen = imageio_ffmpeg.read_frames(raw)
        try:
            w, h = next(gen)["size"]
            frames = [np.frombuffer(b, np.uint8).reshape(h, w, 3) for b in gen]
        finally:
            gen.close()
        return np.stack(frames)
    if kind == "gif":
        with Image.open(raw) as im:
            return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])
    frames = []
    for f in files:
        with Image.open(f) as im:
            frames.append(np.asarray(im.convert("RGB")))
    return np.stack(frames)


def _split_pattern(name: str) -> list[str | None]:
    # "f_%05d.png" -> ["f_", None, ".png"]; None marks the frame number.
    parts: list[str | None] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(name):
        parts += [name[pos : m.start()], None]
        pos = m.end()
    return parts + [name[pos:]]
