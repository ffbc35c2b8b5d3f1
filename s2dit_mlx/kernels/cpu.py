"""The compiled CPU kernels (cpu_kernels.cpp) and the calls that run them on MLX arrays.

The Linux `mlx[cpu]` wheel computes exp, sigmoid and tanh one element at a time (its SIMD
width there is 1 and every polynomial step is an out-of-line `fma` call): ~25 ns per element,
which makes attention softmax and the activations most of a CPU forward pass at video lengths.
cpu_kernels.cpp computes them 16 lanes at a time, and has a GEMM (an AVX-512 micro-kernel)
behind a linear layer, a fused attention and a direct 3D convolution.

The library is compiled at first use (never at import) with the C++ compiler on PATH into the
user cache, and called through ctypes. Every call here returns a NEW array, or None where it
does not apply (another dtype or device, a size below its threshold, shapes the C++ cannot
take, inside an mx.compile trace, no library, no AVX-512F for the GEMM kinds): the caller then
runs MLX's own op. A call evaluates its inputs and reads their buffers; it writes only into an
output it has just allocated and evaluated, which no other op has seen. No input is written.

Which kernels run at all is decided by measurement (choice.py) and opted into per model
(kernels/__init__.py); nothing here is reached unless a model was passed to `enable()`.
Outputs are invisible to autodiff: inference only.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import S2DiTError

DISABLE_ENV = "S2DIT_NO_CPU_KERNELS"
THREADS_ENV = "S2DIT_NUM_THREADS"
SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
# Below this many elements the eval + ctypes round trip costs more than it saves.
MIN_ELEMENTS = 1 << 14
# Below this many multiply-adds OpenBLAS's small-matrix paths are as fast.
MIN_GEMM_MACS = 1 << 24
# Elements per thread of an elementwise kernel (starting a thread costs ~20 us).
ELEMENTS_PER_THREAD = 1 << 20
# Multiply-adds per thread before a product is split: ~0.6 ms of work per core, well above
# the cost of starting a thread, so small products (the built-in model's) stay on one thread:
# splitting them was slower even on an idle machine, and on a busy one every split waits
# for its slowest share.
MACS_PER_THREAD = 1 << 26

# Why the library is not in use, for reports (None: not tried yet, or loaded).
unavailable_reason: str | None = None


# ----------------------------------------------------------------------------------------------
# The library


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "s2dit_mlx" / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _target(compiler: str) -> Path:
    """Where the library built by `compiler` from this source lives (one per source/compiler)."""
    key = hashlib.sha256(
        SOURCE.read_bytes() + f"{compiler}|{platform.machine()}".encode()
    ).hexdigest()[:16]
    return _cache_dir() / f"cpu_kernels-{key}.so"


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
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        unavailable_reason = f"disabled ({DISABLE_ENV} is set)"
        return None
    compiler = _compiler()
    if compiler is None:
        unavailable_reason = "no C++ compiler (c++, g++ or clang++) on PATH"
        return None
    target = _target(compiler)
    try:
        if not target.exists():
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as err:
        unavailable_reason = f"build failed: {err}"
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.s2dit_softmax.argtypes = [ptr, ptr, i64, i64, i64]
    lib.s2dit_silu.argtypes = [ptr, ptr, i64, i64]
    lib.s2dit_gelu_tanh.argtypes = [ptr, ptr, i64, i64]
    lib.s2dit_linear.argtypes = [i64, i64, i64, ptr, i64, ptr, ptr, ptr, i64]
    lib.s2dit_conv3d.argtypes = [ptr, *[i64] * 10, ptr, ptr, i64, ptr, i64]
    lib.s2dit_attention.argtypes = [*[i64] * 5, ptr, ptr, ptr, ptr, ptr, ctypes.c_float, i64, i64]
    lib.s2dit_gemm_supported.argtypes = []
    lib.s2dit_gemm_supported.restype = ctypes.c_int
    for fn in (
        lib.s2dit_softmax, lib.s2dit_silu, lib.s2dit_gelu_tanh, lib.s2dit_linear,
        lib.s2dit_conv3d, lib.s2dit_attention,
    ):  # fmt: skip
        fn.restype = ctypes.c_int  # 0, or non-zero when a work buffer could not be allocated
    unavailable_reason = None
    return lib


def built() -> bool:
    """Whether library() has been loaded in this process (nothing is built by asking)."""
    return library.cache_info().currsize > 0 and library() is not None


def library_status() -> str:
    """The library's state, without building it: loaded, built earlier, to be built, or why not."""
    if library.cache_info().currsize:
        lib = library()
        return f"loaded ({lib._name})" if lib is not None else f"unavailable: {unavailable_reason}"
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return f"off ({DISABLE_ENV} is set)"
    compiler = _compiler()
    if compiler is None:
        return "unavailable: no C++ compiler (c++, g++ or clang++) on PATH"
    target = _target(compiler)
    if target.exists():
        return f"built ({target})"
    return f"not built yet (built at first use with {compiler} into {target.parent})"


def cpu_has_avx512f() -> bool:
    """Whether this CPU has AVX-512F (the GEMM kinds need it), read without the library."""
    if library.cache_info().currsize and library() is not None:
        return bool(library().s2dit_gemm_supported())
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/cpuinfo") as f:
                return any(line.startswith("flags") and " avx512f" in line for line in f)
        except OSError:
            return False
    return False


def gemm_available() -> bool:
    """Whether the kernels' GEMM runs here (builds the library; its micro-kernel: AVX-512F)."""
    lib = library()
    return lib is not None and bool(lib.s2dit_gemm_supported())


# ----------------------------------------------------------------------------------------------
# Threads


@lru_cache(maxsize=1)
def _usable_cpus() -> int:
    from .. import _blas

    return _blas.usable_cpus()


def gemm_threads() -> int:
    """Threads per kernel call: S2DIT_NUM_THREADS, else a thread count the user gave OpenBLAS,
    else every CPU this process may use (affinity and cgroup quota, not the machine's)."""
    for name in (THREADS_ENV, "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return min(int(value), 256)
    return _usable_cpus()


def threads_for(macs: int) -> int:
    """Threads for a product of `macs` multiply-adds: gemm_threads(), fewer for small ones."""
    return max(1, min(gemm_threads(), macs // MACS_PER_THREAD))


def _elementwise_threads(count: int) -> int:
    return max(1, min(gemm_threads(), count // ELEMENTS_PER_THREAD))


# ----------------------------------------------------------------------------------------------
# Buffers


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


def eligible(x: mx.array, min_elements: int = 0) -> bool:
    """Cheap checks before any kernel: float32, MLX on the CPU, at least min_elements."""
    return x.dtype == mx.float32 and x.size >= min_elements and mx.default_device() == mx.cpu


def _new_output(shape: tuple[int, ...]) -> tuple[mx.array, np.ndarray] | None:
    """A new float32 array and a writable view of its buffer: allocated and evaluated here,
    held by nobody else, so writing it changes what no other op has seen. None in traces."""
    check_allocation(4 * math.prod(shape), f"a {list(shape)} output")
    out = mx.zeros(shape, mx.float32)
    try:
        mx.eval(out)
    except ValueError:  # "Attempting to eval an array during function transformations"
        return None
    view = np.asarray(out)
    if not (view.flags.c_contiguous and view.flags.writeable):
        return None
    return out, view


def _read_buffer(x: mx.array, rows_ok: bool = False) -> np.ndarray | None:
    """A numpy view of x's evaluated buffer, to be READ by a kernel: C-contiguous (or, with
    rows_ok, with only the last axis contiguous), else of a contiguous copy of x (e.g. weights
    transposed by sanitize()); None inside traces."""
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


# ----------------------------------------------------------------------------------------------
# Elementwise: SiLU, GELU (tanh), softmax over the last axis


def elementwise_applies(x: mx.array) -> bool:
    return eligible(x, MIN_ELEMENTS)


def _elementwise(x: mx.array, name: str) -> mx.array | None:
    if not elementwise_applies(x) or library() is None:
        return None
    src = _read_buffer(x)
    made = _new_output(tuple(x.shape))
    if src is None or made is None:
        return None
    out, view = made
    failed = getattr(library(), name)(
        src.ctypes.data, view.ctypes.data, x.size, _elementwise_threads(x.size)
    )
    return None if failed else out


def silu(x: mx.array) -> mx.array | None:
    """x * sigmoid(x) as a new array (None: use nn.silu)."""
    return _elementwise(x, "s2dit_silu")


def gelu_tanh(x: mx.array) -> mx.array | None:
    """GELU, tanh approximation (nn.gelu_approx), as a new array (None: use MLX's)."""
    return _elementwise(x, "s2dit_gelu_tanh")


def softmax(x: mx.array) -> mx.array | None:
    """Softmax over the last axis as a new array (None: use mx.softmax)."""
    if x.ndim < 1 or x.shape[-1] < 1 or not elementwise_applies(x) or library() is None:
        return None
    src = _read_buffer(x)
    made = _new_output(tuple(x.shape))
    if src is None or made is None:
        return None
    out, view = made
    cols = x.shape[-1]
    rows = x.size // cols
    failed = library().s2dit_softmax(
        src.ctypes.data, view.ctypes.data, rows, cols, _elementwise_threads(x.size)
    )
    return None if failed else out


def softmax_attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, score_budget: int
) -> mx.array | None:
    """Query-tiled attention on [B, H, L, D]: MLX's products, the softmax kernel (the path
    for CPUs without AVX-512F); at most `score_budget` scores alive at once."""
    if q.ndim != 4 or not eligible(q, MIN_ELEMENTS) or library() is None:
        return None
    batch, heads, lq, _ = q.shape
    tile = max(1, score_budget // (batch * heads * k.shape[2]))
    k_t = mx.contiguous(k.swapaxes(-1, -2))
    q, v = mx.contiguous(q * scale), mx.contiguous(v)
    outs = []
    for i in range(0, lq, tile):
        weights = softmax(q[:, :, i : i + tile] @ k_t)
        if weights is None:
            return None
        out = weights @ v
        mx.eval(out)  # frees this tile's scores before the next tile is computed
        outs.append(out)
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)


# ----------------------------------------------------------------------------------------------
# Matrix products and direct convolution (AVX-512F)


def _gemm_operands_ok(macs: int, x: mx.array, *others: mx.array | None) -> bool:
    """Big enough, x eligible and every other operand float32."""
    return (
        macs >= MIN_GEMM_MACS
        and eligible(x)
        and all(a is None or a.dtype == mx.float32 for a in others)
    )


def linear_applies(x: mx.array, weight: mx.array, bias: mx.array | None) -> bool:
    """Whether linear() takes these operands (shapes the C++ trusts, sizes, dtypes)."""
    if x.ndim < 1 or weight.ndim != 2:
        return False
    k, n = x.shape[-1], weight.shape[0]
    m = x.size // max(k, 1)
    # Shapes the product reads must match (the C++ trusts them), else MLX raises its own error.
    if k < 1 or weight.shape[1] != k or (bias is not None and tuple(bias.shape) != (n,)):
        return False
    # (Narrow outputs waste most of the 32-wide micro-kernel: OpenBLAS does those.)
    return n >= 16 and _gemm_operands_ok(m * n * k, x, weight, bias)


def linear(x: mx.array, weight: mx.array, bias: mx.array | None = None) -> mx.array | None:
    """x @ weight.T + bias with the kernels' GEMM as a new array, or None."""
    if not linear_applies(x, weight, bias) or not gemm_available():
        return None
    k, n = x.shape[-1], weight.shape[0]
    m = x.size // k
    a, w = _read_buffer(x), _read_buffer(weight)
    b = None if bias is None else _read_buffer(bias)
    made = _new_output((m, n))
    if a is None or w is None or made is None or (bias is not None and b is None):
        return None
    out, view = made
    failed = library().s2dit_linear(
        m, n, k, a.ctypes.data, k, w.ctypes.data, _address(b), view.ctypes.data,
        threads_for(m * n * k),
    )  # fmt: skip
    return None if failed else out.reshape(*x.shape[:-1], n)


def _conv3d_geometry(
    x: mx.array, weight: mx.array, causal: bool, padding: tuple[int, int], upsample: int
) -> tuple[int, int, int, int]:
    """(output frames, height, width, multiply-adds) of conv3d()."""
    b, t, h, w, c = x.shape
    o, kt, kh, kw, _ = weight.shape
    ph, pw = padding
    ho, wo = h * upsample + 2 * ph - kh + 1, w * upsample + 2 * pw - kw + 1
    t_out = t if causal else t - kt + 1
    return t_out, ho, wo, b * t_out * ho * wo * o * kt * kh * kw * c


def conv3d_applies(
    x: mx.array,
    weight: mx.array,
    bias: mx.array | None = None,
    history: mx.array | None = None,
    causal: bool = False,
    padding: tuple[int, int] = (0, 0),
    upsample: int = 1,
) -> bool:
    """Whether conv3d() takes these operands (see there)."""
    if x.ndim != 5 or weight.ndim != 5:
        return False
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
        return False
    t_out, ho, wo, macs = _conv3d_geometry(x, weight, causal, padding, upsample)
    # Even a 3-channel output conv is faster here than as 27 three-column products.
    return min(t_out, ho, wo) >= 1 and _gemm_operands_ok(macs, x, weight, bias, history)


def conv3d(
    x: mx.array,
    weight: mx.array,
    bias: mx.array | None = None,
    history: mx.array | None = None,
    causal: bool = False,
    padding: tuple[int, int] = (0, 0),
    upsample: int = 1,
) -> mx.array | None:
    """Stride-1 conv3d of x [B, T, H, W, C] by weight [O, kt, kh, kw, C] as a new array, or None.

    A direct convolution that reads its input in place: with `causal`, x is preceded by
    `history` [B, kt - 1, H, W, C] (None: zeros) and gives T output frames; `padding` zero
    pads (h, w); `upsample` 2 convolves the 2x nearest-upsampled frames. None of these
    inputs is built in memory.
    """
    if not conv3d_applies(x, weight, bias, history, causal, padding, upsample):
        return None
    if not gemm_available():
        return None
    b, t, h, w, c = x.shape
    o, kt, kh, kw, _ = weight.shape
    ph, pw = padding
    t_out, ho, wo, macs = _conv3d_geometry(x, weight, causal, padding, upsample)
    xs, wts = _read_buffer(x), _read_buffer(weight)
    bias_view = None if bias is None else _read_buffer(bias)
    hist = None if history is None or not causal else _read_buffer(history)
    made = _new_output((b, t_out, ho, wo, o))
    given = [(xs, x), (wts, weight), (bias_view, bias), (hist, history if causal else None)]
    if made is None or any(view is None and array is not None for view, array in given):
        return None
    out, out_view = made
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


def attention_scratch_bytes(heads: int, nq: int, nk: int, head_dim: int, threads: int) -> float:
    """Host memory of one attention() call: per thread a score tile and packed keys, values."""
    tile = attention_tile(nq, nk)
    per_thread = tile * (nk + 16) + 2 * (nk + 32) * (head_dim + 32)
    return 4.0 * per_thread * max(1, min(threads, heads))


def attention_applies(q: mx.array, k: mx.array, v: mx.array) -> bool:
    """Whether attention() takes these operands (see there)."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        return False
    b, h, lq, d = q.shape
    lk = k.shape[2]
    # Keys and values must cover every (batch, head) and row the kernel reads.
    if tuple(k.shape) != (b, h, lk, d) or tuple(v.shape) != (b, h, lk, d) or min(lq, lk) < 1:
        return False
    return d >= 16 and _gemm_operands_ok(b * h * lq * lk * d, q, k, v)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array | None:
    """softmax(scale * q k^T) v on [B, H, L, D] arrays (any strides) as a new array, or None.

    Scores are computed a query tile at a time into a small buffer by the kernels' GEMM
    and never reach MLX. The result is [B, H, Lq, D] laid out as [B, Lq, H, D], so the
    usual transpose back to tokens is free.
    """
    if not attention_applies(q, k, v) or not gemm_available():
        return None
    b, h, lq, d = q.shape
    lk = k.shape[2]
    views = [_read_buffer(a, rows_ok=True) for a in (q, k, v)]
    made = _new_output((b, lq, h, d))
    if any(view is None for view in views) or made is None:
        return None
    out, out_view = made
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
