"""Which CPU kernels run: each kind is timed against MLX's own op at its first use.

A kernel is kept only where it measurably beats the library path on the machine it runs on:
the first time a kernel-backed module of a kind would run one, both sides compute one small,
representative problem (a warm-up, then the best of three), and the kernel is used for the
rest of the process only when it was at least `MARGIN` times faster. The result is cached per
process (never on disk: another load or another machine may decide otherwise) and listed by
`s2dit info --kernels`. Tests and benchmarks may `pin()` a kind instead.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from . import cpu

# kind -> what it replaces (for reports).
KINDS = {
    "linear": "nn.Linear's product (OpenBLAS)",
    "attention": "softmax attention, fused with the kernels' GEMM",
    "softmax": "softmax attention, MLX's products with the softmax kernel",
    "silu": "SiLU",
    "gelu_tanh": "GELU (tanh approximation)",
    "conv3d": "the Wan VAE's 3D convolutions (direct, no unfolding)",
}
GEMM_KINDS = ("linear", "attention", "conv3d")
# The kernel runs only when it took at most 1 / MARGIN of the library path's time.
MARGIN = 1.1
REPEATS = 3


@dataclass
class Measurement:
    """One kind's timing: seconds per call of each side on `problem`, and the decision."""

    kind: str
    use_kernel: bool
    problem: str = ""
    unit: str = ""  # what `work` counts: "GFLOP" or "M elements"
    work: float = 0.0
    kernel_s: float | None = None
    library_s: float | None = None
    note: str = ""  # why the kernel was not timed, if it was not

    def rate(self, seconds: float | None) -> str:
        return "-" if not seconds else f"{self.work / seconds:.3g} {self.unit}/s"

    def line(self) -> str:
        """e.g. "silu: kernel (kernel 2.1e+03 M elements/s, library 38 M elements/s on [524288])"."""
        chosen = "kernel" if self.use_kernel else "library"
        if self.note:
            return f"{self.kind}: {chosen} ({self.note})"
        return (
            f"{self.kind}: {chosen} (kernel {self.rate(self.kernel_s)}, library "
            f"{self.rate(self.library_s)} on {self.problem})"
        )


_results: dict[str, Measurement] = {}
_pinned: dict[str, bool] = {}
_lock = threading.Lock()


def pin(kind: str, use_kernel: bool | None) -> None:
    """Decide `kind` without measuring (None: measure again at the next use)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kernel kind {kind!r} (kinds: {', '.join(KINDS)})")
    if use_kernel is None:
        _pinned.pop(kind, None)
        _results.pop(kind, None)
    else:
        _pinned[kind] = bool(use_kernel)


def use(kind: str) -> bool:
    """Whether the kernel of `kind` runs (measured at the first call; cached)."""
    if kind in _pinned:
        return _pinned[kind]
    found = _results.get(kind)
    if found is None:
        with _lock:
            found = _results.get(kind)
            if found is None:
                try:
                    found = measure(kind)
                except ValueError:  # called inside mx.compile: measure at a later call
                    return False
                _results[kind] = found
    return found.use_kernel


def measurements() -> list[Measurement]:
    """The kinds measured (or pinned) in this process so far, in KINDS order."""
    out = []
    for kind in KINDS:
        if kind in _pinned:
            out.append(Measurement(kind, _pinned[kind], note="pinned"))
        elif kind in _results:
            out.append(_results[kind])
    return out


def _best(fn: Callable[[], mx.array | None]) -> float | None:
    """Best of REPEATS timed calls after a warm-up (None: the kernel did not run)."""
    if fn() is None:
        return None
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        out = fn()
        mx.eval(out)
        best = min(best, time.perf_counter() - start)
    return best


def _normal(*shape: int) -> mx.array:
    x = mx.random.normal(shape, key=mx.random.key(sum(shape)))
    mx.eval(x)
    return x


def _problem(kind: str):
    """(description, unit, work, kernel call, library call) of kind's timing problem."""
    from ..models import layers, wan_vae

    if kind == "linear":
        m, k, n = 512, 1024, 1024
        x, w, b = _normal(m, k), _normal(n, k) * k**-0.5, _normal(n)
        return (
            f"[{m}, {k}] x [{k}, {n}]",
            "GFLOP",
            2e-9 * m * n * k,
            lambda: cpu.linear(x, w, b),
            lambda: mx.addmm(b, x, w.T),
        )
    if kind in ("attention", "softmax"):
        batch, heads, length, dim = 1, 4, 512, 64
        # [B, L, H, D] transposed to [B, H, L, D]: the strided views the models pass.
        q, k, v = (_normal(batch, length, heads, dim).swapaxes(1, 2) for _ in range(3))
        scale = dim**-0.5
        budget = layers.ATTENTION_SCORE_BUDGET
        kernel = (
            (lambda: cpu.attention(q, k, v, scale))
            if kind == "attention"
            else (lambda: cpu.softmax_attention(q, k, v, scale, budget))
        )
        return (
            f"{heads} heads x {length} x {length} tokens, head dim {dim}",
            "GFLOP",
            4e-9 * batch * heads * length * length * dim,
            kernel,
            lambda: layers.attention(q, k, v, scale),
        )
    if kind in ("silu", "gelu_tanh"):
        count = 1 << 19
        x = _normal(count)
        ours = cpu.silu if kind == "silu" else cpu.gelu_tanh
        theirs = nn.silu if kind == "silu" else nn.gelu_approx
        return f"[{count}]", "M elements", count / 1e6, lambda: ours(x), lambda: theirs(x)
    if kind == "conv3d":
        shape, cout = (1, 2, 32, 32, 64), 64
        x = _normal(*shape)
        conv = wan_vae.CausalConv3d(shape[-1], cout, 3)
        conv.weight = _normal(*conv.weight.shape) * 0.05
        mx.eval(conv.parameters())
        macs = 2 * 32 * 32 * cout * 27 * shape[-1]
        return (
            f"causal 3x3x3, {shape[-1]} -> {cout} channels, {list(shape)}",
            "GFLOP",
            2e-9 * macs,
            lambda: cpu.conv3d(x, conv.weight, conv.bias, None, causal=True, padding=(1, 1)),
            lambda: wan_vae.CausalConv3d.__call__(conv, x),
        )
    raise ValueError(f"unknown kernel kind {kind!r}")


def measure(kind: str) -> Measurement:
    """Time kind's kernel and the library path now (builds the library if needed)."""
    if kind not in KINDS:
        raise KeyError(kind)
    if cpu.library() is None:
        return Measurement(kind, False, note=f"kernels unavailable: {cpu.unavailable_reason}")
    if kind in GEMM_KINDS and not cpu.gemm_available():
        return Measurement(kind, False, note="its GEMM needs AVX-512F, which this CPU lacks")
    with mx.stream(mx.cpu):
        problem, unit, work, kernel, library = _problem(kind)
        kernel_s = _best(kernel)
        library_s = _best(library)
    if kernel_s is None:
        return Measurement(kind, False, problem, unit, work, None, library_s, "did not run")
    use_kernel = library_s is not None and kernel_s * MARGIN < library_s
    return Measurement(kind, use_kernel, problem, unit, work, kernel_s, library_s)
