"""Environment report for `s2dit info`: versions, device, BLAS and a quick GEMM measurement."""

from __future__ import annotations

import os
import platform
import time

import mlx.core as mx
import numpy as np

from . import __version__, _blas
from .kernels import cpu as cpu_kernels


def gemm_gflops(n: int = 1024, dtype: mx.Dtype = mx.float32, repeats: int = 5) -> float:
    """Best-of-`repeats` MLX matmul throughput for an n x n x n product, in GFLOP/s."""
    a = mx.random.normal((n, n)).astype(dtype)
    b = mx.random.normal((n, n)).astype(dtype)
    mx.eval(a, b)
    mx.eval(a @ b)  # warm-up: thread pools, kernel selection
    best = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best / 1e9


def _device_line() -> str:
    try:
        metal = "yes" if mx.metal.is_available() else "no"
    except (AttributeError, RuntimeError):  # older or Metal-less builds
        metal = "no"
    return f"device: {mx.default_device()} (Metal available: {metal})"


def _threads_line() -> str:
    """Threads of OpenBLAS and of our kernels, and the CPUs this process may use."""
    usable = _blas.usable_cpus()
    blas = "n/a" if _blas.openblas_threads is None else str(_blas.openblas_threads)
    if _blas.threads_source not in ("", "default"):
        blas += f" (from {_blas.threads_source})"
    kernels = cpu_kernels.gemm_threads()
    env = next(
        (n for n in (cpu_kernels.THREADS_ENV, "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")
         if os.environ.get(n, "").strip()),
        None,
    )  # fmt: skip
    source = f" (from {env})" if env else ""
    return f"threads: OpenBLAS {blas}, CPU kernels {kernels}{source}; usable CPUs {usable}"


def info_lines(gemm: bool = True) -> list[str]:
    """Human-readable lines describing this installation; `gemm=False` skips the measurement."""
    lines = [
        f"s2dit-mlx: {__version__}",
        f"MLX: {mx.__version__}",
        _device_line(),
        f"BLAS: {_blas.describe()}",
        f"CPU kernels (inference): {cpu_kernels.status()}",
        _threads_line(),
    ]
    if gemm:
        lines.append(f"fp32 GEMM (n=1024): {gemm_gflops(1024):.1f} GFLOP/s")
    lines += [
        f"numpy: {np.__version__}",
        f"python: {platform.python_version()} on {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs",
    ]
    return lines
