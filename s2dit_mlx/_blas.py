"""Make MLX's CPU backend use OpenBLAS on Linux.

The Linux `mlx[cpu]` wheel links a reference BLAS (~4-6 GFLOP/s fp32 GEMM).
Loading an unprefixed OpenBLAS with RTLD_GLOBAL before `mlx.core` is first
imported makes MLX's sgemm calls resolve to it (~150+ GFLOP/s on 2 cores).
cmeel-openblas ships such a library; it needs libgfortran.so.5, which fresh
machines often lack, so we fall back to the libgfortran that the mlx/numpy
wheels bundle under a hashed name, re-labelled in a cache folder.

Set S2DIT_NO_OPENBLAS=1 to turn all of this off.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
import sysconfig
from pathlib import Path

DISABLE_ENV = "S2DIT_NO_OPENBLAS"

# What happened, for `s2dit info`: "openblas", "disabled", "not-linux", "already-imported",
# or "reference (<reason>)".
status: str = "not-run"
library: str | None = None


def _site_dirs() -> list[Path]:
    dirs = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    dirs.update(p for p in sys.path if p.endswith("site-packages"))
    return [Path(d) for d in dirs if Path(d).is_dir()]


def _find(pattern: str) -> list[Path]:
    return [Path(p) for d in _site_dirs() for p in sorted(glob.glob(str(d / pattern)))]


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "s2dit_mlx" / "blas"


def _load_bundled_gfortran() -> None:
    """Load a wheel-bundled libgfortran under the soname OpenBLAS asks for."""
    for gf in _find("mlx_cpu.libs/libgfortran-*.so*") + _find("numpy.libs/libgfortran-*.so*"):
        for quad in gf.parent.glob("libquadmath-*.so*"):
            ctypes.CDLL(str(quad), mode=ctypes.RTLD_GLOBAL)
        data = gf.read_bytes()
        old = gf.name.encode() + b"\0"
        if data.count(old) != 1:
            continue
        # Rewrite the soname in place (same length, NUL padded) so the dynamic loader
        # matches OpenBLAS's DT_NEEDED "libgfortran.so.5" against it.
        patched = data.replace(old, b"libgfortran.so.5".ljust(len(old), b"\0"))
        target = _cache_dir() / f"{gf.stem}-{len(data)}" / "libgfortran.so.5"
        if not target.exists() or target.read_bytes() != patched:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(patched)
            os.replace(tmp, target)
        ctypes.CDLL(str(target), mode=ctypes.RTLD_GLOBAL)
        return
    raise OSError("no bundled libgfortran found")


def setup() -> str:
    """Load OpenBLAS globally before mlx.core is imported (Linux only); returns the status."""
    global status, library
    if status != "not-run":
        return status
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        status = "disabled"
    elif not sys.platform.startswith("linux"):
        status = "not-linux"
    elif "mlx.core" in sys.modules:
        status = "already-imported"
    else:
        candidates = _find("cmeel.prefix/lib/libopenblas.so.0") + _find(
            "cmeel.prefix/lib/libopenblas.so"
        )
        if not candidates:
            status = "reference (cmeel-openblas not installed)"
            return status
        path = str(candidates[0])
        try:
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError as err:
                if "libgfortran" not in str(err):
                    raise
                _load_bundled_gfortran()
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            status, library = "openblas", path
        except OSError as err:
            status = f"reference (could not load OpenBLAS: {err})"
    return status


def describe() -> str:
    """One line saying which BLAS MLX's CPU backend uses."""
    if status == "openblas":
        return f"OpenBLAS ({library})"
    if status == "not-linux":
        return "Accelerate / Metal (macOS)"
    if status == "disabled":
        return f"reference BLAS ({DISABLE_ENV} is set)"
    if status == "already-imported":
        return "unknown (mlx.core was imported before s2dit_mlx)"
    return status
