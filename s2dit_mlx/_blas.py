"""Make MLX's CPU backend use OpenBLAS on Linux.

The Linux `mlx[cpu]` wheel links a reference BLAS (~4-6 GFLOP/s fp32 GEMM).
Loading an unprefixed OpenBLAS with RTLD_GLOBAL before `mlx.core` is first
imported makes MLX's sgemm calls resolve to it (~150+ GFLOP/s on 2 cores).
cmeel-openblas ships such a library; it needs libgfortran.so.5, which fresh
machines often lack, so we fall back to the libgfortran that the mlx/numpy
wheels bundle under a hashed name, re-labelled in a cache folder.

Set S2DIT_NO_OPENBLAS=1 to turn all of this off.

Threads: OpenBLAS runs single-threaded unless OPENBLAS_NUM_THREADS (or GOTO_/OMP_NUM_THREADS)
says otherwise. MLX hands it many small products, where splitting costs more than it saves,
and its threads busy-wait for each other: with another CPU-bound process on the machine a
waiting thread burns the time slice its partner needs, and generation ran 10-40x slower
than with one thread. The large products of inference run on our own kernels
(kernels/cpu.py), whose threads (`usable_cpus()` of them) block instead of spinning.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
import sysconfig
from pathlib import Path

DISABLE_ENV = "S2DIT_NO_OPENBLAS"
# Environment variables OpenBLAS reads for its thread count at load time.
THREAD_ENVS = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")

# What happened, for `s2dit info`: "openblas", "disabled", "not-linux", "already-imported",
# or "reference (<reason>)".
status: str = "not-run"
library: str | None = None
# OpenBLAS's thread count once loaded (None: not loaded), and who chose it.
openblas_threads: int | None = None
threads_source: str = ""


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
            _set_threads(ctypes.CDLL(path))
        except OSError as err:
            status = f"reference (could not load OpenBLAS: {err})"
    return status


def _set_threads(lib: ctypes.CDLL) -> None:
    """One OpenBLAS thread unless the user's environment asked for a count (see the top)."""
    global openblas_threads, threads_source
    chosen = next((name for name in THREAD_ENVS if os.environ.get(name, "").strip()), None)
    try:
        if chosen is None:
            lib.openblas_set_num_threads(1)
        lib.openblas_get_num_threads.restype = ctypes.c_int
        openblas_threads = int(lib.openblas_get_num_threads())
    except AttributeError:  # an OpenBLAS without the thread API: leave it as it is
        return
    threads_source = chosen or "default"


def _cgroup_cpu_limit() -> int | None:
    """CPUs allowed by a cgroup v2 (cpu.max) or v1 (cfs quota) limit, rounded up; None: none."""
    for quota_file, period_file in (
        ("/sys/fs/cgroup/cpu.max", None),
        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
    ):
        try:
            fields = Path(quota_file).read_text().split()
            if period_file is not None:
                fields.append(Path(period_file).read_text().strip())
        except OSError:
            continue
        if len(fields) < 2 or fields[0] in ("max", "-1"):
            return None
        try:
            quota, period = int(fields[0]), int(fields[1])
        except ValueError:
            return None
        if quota > 0 and period > 0:
            return max(1, -(-quota // period))
    return None


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS has no affinity API
        count = os.cpu_count() or 1
    limit = _cgroup_cpu_limit() if sys.platform.startswith("linux") else None
    return max(1, min(count, limit) if limit else count)


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
