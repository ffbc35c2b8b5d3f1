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
import math
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

from ..errors import S2DiTError

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
    cmd = [compiler, "-std=c++17", "-O3", "-fPIC", "-shared", "-pthread", "-Wno-psabi"]
    cmd.append(str(SOURCE))
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
    lib.s2dit_softmax_rows.argtypes = [ptr, i64, i64, ctypes.c_float]
    lib.s2dit_silu.argtypes = [ptr, i64]
    lib.s2dit_gelu_tanh.argtypes = [ptr, i64]
    lib.s2dit_linear.argtypes = [i64, i64, i64, ptr, i64, ptr, ptr, ptr, i64]
    lib.s2dit_conv3d.argtypes = [ptr, *[i64] * 10, ptr, ptr, i64, ptr, i64]
    lib.s2dit_attention.argtypes = [*[i64] * 5, ptr, ptr, ptr, ptr, ptr, ctypes.c_float, i64, i64]
    lib.s2dit_gemm_supported.argtypes = []
    lib.s2dit_gemm_supported.restype = ctypes.c_int
    for fn in (lib.s2dit_softmax_rows, lib.s2dit_silu, lib.s2dit_gelu_tanh):
        fn.restype = None
    for fn in (lib.s2dit_linear, lib.s2dit_conv3d, lib.s2dit_attention):
        fn.restype = ctypes.c_int  # 0, or non-zero when a work buffer could not be allocated
    unavailable_reason = None
    return lib


def status() -> str:
    """For reports: the library in use ("vectorised (path)"), or why MLX's own ops run."""
    lib = library()
    if lib is None:
        return f"off: {unavailable_reason}"
    gemm = "AVX-512 GEMM, attention and conv" if gemm_available() else "no GEMM (needs AVX-512F)"
    return f"vectorised, {gemm} ({lib._name})"


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
    check_allocation(x.nbytes, f"a {list(x.shape)} array")
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
    if scores.ndim < 1 or scores.shape[-1] < 1:
        return False
    view = _owned_buffer(scores)
    if view is None:
        return False
    cols = view.shape[-1]
    library().s2dit_softmax_rows(view.ctypes.data, view.size // cols, cols, 1.0)
    return True


# ----------------------------------------------------------------------------------------------
# Matrix products and direct convolution

# Below this many multiply-adds OpenBLAS's small-matrix paths are as fast.
MIN_GEMM_MACS = 1 << 24


def gemm_available() -> bool:
    """Whether the kernels' GEMM runs on this CPU (its micro-kernel needs AVX-512F)."""
    lib = library()
    return lib is not None and bool(lib.s2dit_gemm_supported())


THREADS_ENV = "S2DIT_NUM_THREADS"


@lru_cache(maxsize=1)
def _usable_cpus() -> int:
    from .. import _blas

    return _blas.usable_cpus()


def gemm_threads() -> int:
    """Threads per product: S2DIT_NUM_THREADS, else a thread count the user gave OpenBLAS,
    else every CPU this process may use (affinity and cgroup quota, not the machine's)."""
    for name in (THREADS_ENV, "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return min(int(value), 256)
    return _usable_cpus()


# Multiply-adds per thread before a product is split: ~0.6 ms of work per core, well above
# the cost of starting a thread, so small products (the built-in model's) stay on one thread:
# splitting them was slower even on an idle machine, and on a busy one every split waits
# for its slowest share.
MACS_PER_THREAD = 1 << 26


def threads_for(macs: int) -> int:
    """Threads for a product of `macs` multiply-adds: gemm_threads(), fewer for small ones."""
    return max(1, min(gemm_threads(), macs // MACS_PER_THREAD))


def _gemm_usable(macs: int, x: mx.array, *others: mx.array | None) -> bool:
    """Enabled, big enough, x usable (see usable()) and every other operand float32."""
    return (
        macs >= MIN_GEMM_MACS
        and usable(x)
        and all(a is None or a.dtype == mx.float32 for a in others)
        and gemm_available()
    )


def check_allocation(nbytes: int, what: str = "an array") -> None:
    """Raise S2DiTError when `nbytes` cannot be allocated on this machine at all.

    MLX's CPU allocator does not check malloc's result: an array that cannot be allocated is
    then written through a null pointer and the process dies of a segmentation fault (how
    `generate --height 99968 --width 99968` crashed in `_read_buffer`). We evaluate arrays
    here, so we refuse those sizes first; the resource guard (resources.py) stops such
    requests long before, this is the last line of defence.
    """
    from ..resources import memory_ceiling

    ceiling = memory_ceiling()
    if ceiling is not None and nbytes > ceiling:
        raise S2DiTError(
            f"out of memory: {what} of {nbytes / 1e9:.3g} GB does not fit in this machine's "
            f"{ceiling / 1e9:.3g} GB of memory and swap; choose smaller sizes"
        )


def _zeros(shape: tuple[int, ...]) -> mx.array:
    """A float32 output buffer, refused (S2DiTError) when it cannot exist."""
    check_allocation(4 * math.prod(shape), f"a {list(shape)} output")
    return mx.zeros(shape, mx.float32)


def _read_buffer(x: mx.array, rows_ok: bool = False) -> np.ndarray | None:
    """A numpy view of x's evaluated buffer, C-contiguous (or, with rows_ok, with only the
    last axis contiguous), else of a contiguous copy of x (e.g. weights transposed by
    sanitize()); None inside traces."""
    check_allocation(x.nbytes, f"a {list(x.shape)} array")
    try:
        mx.eval(x)
    except ValueError:
        return None
    view = np.asarray(x)
    strided_ok = rows_ok and view.strides[-1] == 4 and all(st % 4 == 0 for st in view.strides)
    if not (view.flags.c_contiguous or strided_ok):
        x = mx.contiguous(x)
        mx.eval(x)
        view = np.asarray(x)
    return view


def _address(view: np.ndarray | None) -> int | None:
    return None if view is None else view.ctypes.data


def linear(x: mx.array, weight: mx.array, bias: mx.array | None = None) -> mx.array | None:
    """x @ weight.T + bias with the kernels' GEMM, or None where it does not apply."""
    if x.ndim < 1 or weight.ndim != 2:
        return None
    k, n = x.shape[-1], weight.shape[0]
    m = x.size // max(k, 1)
    # Shapes the product reads must match (the C++ trusts them), else MLX raises its own error.
    if k < 1 or weight.shape[1] != k or (bias is not None and tuple(bias.shape) != (n,)):
        return None
    # (Narrow outputs waste most of the 32-wide micro-kernel: OpenBLAS does those.)
    if n < 16 or not _gemm_usable(m * n * k, x, weight, bias):
        return None
    a, w = _read_buffer(x), _read_buffer(weight)
    b = None if bias is None else _read_buffer(bias)
    out = _zeros((m, n))
    view = _owned_buffer(out)
    if a is None or w is None or view is None or (bias is not None and b is None):
        return None
    failed = library().s2dit_linear(
        m,
        n,
        k,
        a.ctypes.data,
        k,
        w.ctypes.data,
        _address(b),
        view.ctypes.data,
        threads_for(m * n * k),
    )
    return None if failed else out.reshape(*x.shape[:-1], n)


def conv3d(
    x: mx.array,
    weight: mx.array,
    bias: mx.array | None = None,
    history: mx.array | None = None,
    causal: bool = False,
    padding: tuple[int, int] = (0, 0),
    upsample: int = 1,
) -> mx.array | None:
    """Stride-1 conv3d of x [B, T, H, W, C] by weight [O, kt, kh, kw, C], or None.

    A direct convolution that reads its input in place: with `causal`, x is preceded by
    `history` [B, kt - 1, H, W, C] (None: zeros) and gives T output frames; `padding` zero
    pads (h, w); `upsample` 2 convolves the 2x nearest-upsampled frames. None of these
    inputs is built in memory.
    """
    if x.ndim != 5 or weight.ndim != 5:
        return None
    b, t, h, w, c = x.shape
    o, kt, kh, kw, cin = weight.shape
    ph, pw = padding
    # Every shape the C++ reads through a pointer must match, else MLX's own ops run.
    if (
        cin != c
        or min(h, w, c, o, kt, kh, kw, upsample) < 1
        or min(ph, pw) < 0
        or (bias is not None and tuple(bias.shape) != (o,))
        or (causal and history is not None and tuple(history.shape) != (b, kt - 1, h, w, c))
    ):
        return None
    ho, wo = h * upsample + 2 * ph - kh + 1, w * upsample + 2 * pw - kw + 1
    t_out = t if causal else t - kt + 1
    macs = b * t_out * ho * wo * o * kt * kh * kw * c
    # Even a 3-channel output conv is faster here than as 27 three-column products.
    if min(t_out, ho, wo) < 1 or not _gemm_usable(macs, x, weight, bias, history):
        return None
    xs, wts = _read_buffer(x), _read_buffer(weight)
    bias_view = None if bias is None else _read_buffer(bias)
    hist = None if history is None or not causal else _read_buffer(history)
    out = _zeros((b, t_out, ho, wo, o))
    out_view = _owned_buffer(out)
    given = [(xs, x), (wts, weight), (bias_view, bias), (hist, history), (out_view, out)]
    if any(view is None and array is not None for view, array in given):
        return None
    frame_bytes = h * w * c * 4
    for i in range(b):
        # The kt - 1 frames before x (None: zeros), then x's own.
        frames = [None if hist is None else hist[i, j].ctypes.data for j in range(kt - 1)]
        frames = (frames if causal else []) + [
            xs.ctypes.data + (i * t + j) * frame_bytes for j in range(t)
        ]
        table = (ctypes.c_void_p * len(frames))(*frames)
        failed = library().s2dit_conv3d(
            table, len(frames), h, w, c, upsample, kt, kh, kw, ph, pw, wts.ctypes.data,
            _address(bias_view), o, out_view[i].ctypes.data, threads_for(macs // b),
        )  # fmt: skip
        if failed:
            return None
    return out


# Query rows per score tile: a [tile, keys] float32 buffer of about 1 MB per thread (stays
# in L2 from the scores product through the softmax to the values product), in whole
# micro-kernel tiles (MR in cpu_kernels.cpp): at 4680 keys, 56 rows would compute 60.
ATTENTION_TILE_ELEMENTS = 1 << 18
GEMM_TILE_ROWS = 12


def attention_tile(lq: int, lk: int) -> int:
    """Query rows per score tile for lq queries over lk keys."""
    tiles = max(1, round(ATTENTION_TILE_ELEMENTS / lk / GEMM_TILE_ROWS))
    return min(lq, tiles * GEMM_TILE_ROWS)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array | None:
    """softmax(scale * q k^T) v on [B, H, L, D] arrays (any strides), or None.

    Scores are computed a query tile at a time into a small buffer by the kernels' GEMM
    and never reach MLX. The result is [B, H, Lq, D] laid out as [B, Lq, H, D], so the
    usual transpose back to tokens is free.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        return None
    b, h, lq, d = q.shape
    lk = k.shape[2]
    # Keys and values must cover every (batch, head) and row the kernel reads.
    if tuple(k.shape) != (b, h, lk, d) or tuple(v.shape) != (b, h, lk, d) or min(lq, lk) < 1:
        return None
    if d < 16 or not _gemm_usable(b * h * lq * lk * d, q, k, v):
        return None
    views = [_read_buffer(a, rows_ok=True) for a in (q, k, v)]
    out = _zeros((b, lq, h, d))
    out_view = _owned_buffer(out)
    if any(view is None for view in views) or out_view is None:
        return None
    strides = [st // 4 for view in views for st in view.strides[:3]]
    strides += [lq * h * d, d, h * d]  # out as [B, H, L, D]
    table = (ctypes.c_int64 * 12)(*strides)
    tile = attention_tile(lq, lk)
    qv, kv, vv = views
    failed = library().s2dit_attention(
        b, h, lq, lk, d, qv.ctypes.data, kv.ctypes.data, vv.ctypes.data, out_view.ctypes.data,
        table, scale, tile, threads_for(b * h * lq * lk * d),
    )  # fmt: skip
    return None if failed else out.transpose(0, 2, 1, 3)
