"""OpenBLAS for MLX's CPU backend on Linux: `setup_blas()`, which only entry points call.

The Linux `mlx[cpu]` wheel links a reference BLAS (~4-6 GFLOP/s fp32 GEMM). Loading an
unprefixed OpenBLAS with RTLD_GLOBAL before `mlx.core` is first imported makes MLX's sgemm
calls resolve to it (~200 GFLOP/s per core). cmeel-openblas ships such a library; it needs
libgfortran.so.5, which fresh machines often lack, so we fall back to the libgfortran that
the mlx/numpy wheels bundle under a hashed name, re-labelled in a cache folder.

That changes the whole process: every library loaded later resolves its BLAS symbols to this
OpenBLAS (PyTorch's sgemm then ignores `torch.set_num_threads`). So `import s2dit_mlx` does
none of it. The `s2dit` command (cli.main), `python -m convert.*` / `python -m train.*`
(their package's __init__), the benchmarks and the test suite call `setup_blas()` before
anything imports mlx.core; a program that embeds the library may call it the same way
(`from s2dit_mlx import setup_blas`). Set S2DIT_NO_OPENBLAS=1 to turn it off.

Threads: one OpenBLAS thread unless OPENBLAS_NUM_THREADS (or GOTO_/OMP_NUM_THREADS) says
otherwise. OpenBLAS's threads wait for each other by spinning, inside every product and for a
while after it: with another CPU-bound process on the machine a waiting thread burns the time
slice its partner needs, and generation ran 10-40x slower with 2 threads than with 1
(benchmarks/contention.py). OPENBLAS_THREAD_TIMEOUT=4 (sleep at once between calls) left it
1.6-20x slower than the default in our runs, and a thread count picked from the load at start-up is
wrong as soon as another job starts. The other cores are used by the CPU kernels
(s2dit_mlx/kernels), whose threads block instead of spinning; their GEMM replaces OpenBLAS's
where it measures faster on the machine (see `s2dit info --kernels`).
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

# What happened, for `s2dit info`: "not-run" (setup_blas() was not called), "openblas",
# "disabled", "not-linux", "already-imported", or "reference (<reason>)".
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


def setup_blas() -> str:
    """Load OpenBLAS globally before mlx.core is imported (Linux only); returns the status.

    For entry points only (see the top): it changes every library loaded after it.
    """
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


def setup_blas_if_run_as_module() -> None:
    """setup_blas() when this process was started as `python -m package.module`.

    For the __init__ of a package whose modules are entry points (convert, train): Python
    imports the package while sys.argv[0] is still "-m", before the module's own imports
    (mlx.core among them) run. An ordinary `import train` changes nothing.
    """
    if sys.argv[:1] == ["-m"]:
        setup_blas()


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


def threads_line() -> str:
    """OpenBLAS's thread count and why, for `s2dit info` ("" when OpenBLAS is not loaded)."""
    if openblas_threads is None:
        return ""
    plural = "" if openblas_threads == 1 else "s"
    if threads_source and threads_source != "default":
        return f"{openblas_threads} thread{plural} (from {threads_source})"
    return (
        f"{openblas_threads} thread{plural} (the default: OpenBLAS threads spin while they "
        "wait, which made generation 10-40x slower next to another busy process; "
        "OPENBLAS_NUM_THREADS sets it)"
    )


def describe() -> str:
    """One line saying which BLAS MLX's CPU backend uses, and why."""
    if status == "openblas":
        return f"OpenBLAS ({library})"
    if status == "not-linux":
        return "Accelerate / Metal (macOS)"
    if status == "disabled":
        return f"reference BLAS ({DISABLE_ENV} is set)"
    if status == "already-imported":
        return "the mlx wheel's own (mlx.core was imported before setup_blas())"
    if status == "not-run":
        if not sys.platform.startswith("linux"):
            return "Accelerate / Metal (macOS)"
        return (
            "the mlx wheel's reference BLAS (setup_blas() was not called: only the s2dit "
            "entry points load OpenBLAS)"
        )
    return status
