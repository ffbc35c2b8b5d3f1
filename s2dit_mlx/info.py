"""Environment report for `s2dit info`: versions, device, BLAS, the CPU kernels, a GEMM rate."""

from __future__ import annotations

import os
import platform
import time

import mlx.core as mx
import numpy as np

from . import __version__, _blas, kernels


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


def _blas_lines() -> list[str]:
    """Which BLAS MLX uses and why; OpenBLAS's threads and why; the CPUs we may use."""
    lines = [f"BLAS: {_blas.describe()}"]
    threads = _blas.threads_line()
    if threads:
        lines.append(f"  OpenBLAS threads: {threads}")
    lines.append(f"  usable CPUs: {_blas.usable_cpus()}")
    return lines


def info_lines(gemm: bool = True, measure_kernels: bool = False) -> list[str]:
    """Human-readable lines describing this installation; `gemm=False` skips the GEMM
    measurement, `measure_kernels` builds the CPU kernels if needed and times every kind."""
    lines = [
        f"s2dit-mlx: {__version__}",
        f"MLX: {mx.__version__}",
        _device_line(),
        *_blas_lines(),
        *kernels.report(measure_now=measure_kernels),
    ]
    if gemm:
        lines.append(f"fp32 GEMM (n=1024): {gemm_gflops(1024):.1f} GFLOP/s")
    lines += [
        f"numpy: {np.__version__}",
        f"python: {platform.python_version()} on {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs",
    ]
    return lines
