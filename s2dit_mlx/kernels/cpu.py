"""Vectorised softmax, SiLU and GELU for inference on MLX's CPU backend.

The Linux `mlx[cpu]` wheel computes exp, sigmoid and tanh one element at a time (its SIMD
width there is 1 and every polynomial step is an out-of-line `fma` call): ~25 ns per
element, which makes attention softmax and the FFN's GELU most of a CPU forward pass at
video lengths. `cpu_kernels.cpp` computes the same functions 16 lanes at a time. It is
compiled once per machine with the system C++ compiler (as MLX compiles its own CPU
kernels) into the user cache, and called through ctypes on the buffer of an array we just
computed and nobody else holds, in place.

That bypasses MLX's graph, so it is only safe where nothing differentiates or traces the
computation: it is off unless a caller opts in with `enabled()` (the inference pipelines and
benchmarks do; training never does), it needs the CPU device and float32, and anything
else (a compile trace, no compiler, S2DIT_NO_CPU_KERNELS=1) falls back to MLX's own ops.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

DISABLE_ENV = "S2DIT_NO_CPU_KERNELS"
SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
# Below this many elements the eval + ctypes round trip costs more than it saves.
MIN_ELEMENTS = 1 << 14

_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("s2dit_cpu_kernels", default=False)
# Why the library is not in use, for `s2dit info` (None: not tried yet or loaded).
unavailable_reason: str | None = None


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "s2dit_mlx" / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build(compiler: str, target: Path) -> None:
    """Compile the kernels into `target` (written under a temporary name, then renamed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [compiler, "-std=c++17", "-O3", "-fPIC", "-shared", "-Wno-psabi", str(SOURCE)]
    try:
        done = subprocess.run([*cmd, "-o", tmp], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise OSError(done.stderr.strip().splitlines()[-1] if done.stderr else "failed")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernels (built on first use), or None where they cannot be had."""
    global unavailable_reason
    if os.environ.get(DISABLE_ENV):
        unavailable_reason = f"disabled ({DISABLE_ENV} is set)"
        return None
    compiler = _compiler()
    if compiler is None:
        unavailable_reason = "no C++ compiler (c++, g++ or clang++) on PATH"
        return None
    key = hashlib.sha256(
        SOURCE.read_bytes() + f"{compiler}|{platform.machine()}".encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"cpu_kernels-{key}.so"
    try:
        if not target.exists():
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as err:
        unavailable_reason = f"build failed: {err}"
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.s2dit_softmax_rows.argtypes = [ptr, i64, i64]
    lib.s2dit_silu.argtypes = [ptr, i64]
    lib.s2dit_gelu_tanh.argtypes = [ptr, i64]
    for fn in (lib.s2dit_softmax_rows, lib.s2dit_silu, lib.s2dit_gelu_tanh):
        fn.restype = None
    unavailable_reason = None
    return lib


def status() -> str:
    """For reports: the library in use ("vectorised (path)"), or why MLX's own ops run."""
    lib = library()
    return f"vectorised ({lib._name})" if lib is not None else f"off: {unavailable_reason}"


@contextlib.contextmanager
def enabled(on: bool = True) -> Iterator[None]:
    """Let the kernels run inside this block (inference only: they are invisible to grad)."""
    token = _ENABLED.set(on)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def step_enabled(steps: Iterator) -> Iterator:
    """Run each step of a generator inside `enabled()`, without leaking it between steps."""
    while True:
        with enabled():
            try:
                item = next(steps)
            except StopIteration:
                return
        yield item


def usable(x: mx.array) -> bool:
    """Whether the kernels may run on `x` here (enabled, CPU, float32, big enough)."""
    return (
        _ENABLED.get()
        and x.dtype == mx.float32
        and x.size >= MIN_ELEMENTS
        and mx.default_device() == mx.cpu
        and library() is not None
    )


def _owned_buffer(x: mx.array) -> np.ndarray | None:
    """Evaluate a fresh array and view its buffer (None inside compile and other traces)."""
    try:
        mx.eval(x)
    except ValueError:  # "Attempting to eval an array during function transformations"
        return None
    view = np.asarray(x)
    if not (view.flags.c_contiguous and view.flags.writeable):
        return None
    return view


def _apply(x: mx.array, fresh: bool, name: str) -> mx.array | None:
    """Kernel `name` over every element of x: in place when `fresh`, else on a copy."""
    if not usable(x):
        return None
    out = x if fresh else x * 1.0  # x * 1.0: a buffer of our own when x may be shared
    view = _owned_buffer(out)
    if view is None:
        return None
    getattr(library(), name)(view.ctypes.data, view.size)
    return out


def silu(x: mx.array, fresh: bool = False) -> mx.array:
    """x * sigmoid(x), vectorised when enabled on the CPU.

    fresh=True promises that x was just returned by an MLX op and is held by nobody else
    (a new array: MLX only reuses a buffer nothing else references), so it is overwritten.
    """
    out = _apply(x, fresh, "s2dit_silu")
    return nn.silu(x) if out is None else out


def gelu_tanh(x: mx.array, fresh: bool = False) -> mx.array:
    """GELU with the tanh approximation, vectorised when enabled on the CPU (fresh: as silu)."""
    out = _apply(x, fresh, "s2dit_gelu_tanh")
    return nn.gelu_approx(x) if out is None else out


def softmax_scores(scores: mx.array) -> bool:
    """Softmax over the last axis of `scores`, in place, when it is a fresh array only the
    caller holds; False when that cannot be done (the caller then uses mx.softmax)."""
    if not usable(scores):
        return False
    view = _owned_buffer(scores)
    if view is None:
        return False
    cols = view.shape[-1]
    library().s2dit_softmax_rows(view.ctypes.data, view.size // cols, cols)
    return True
