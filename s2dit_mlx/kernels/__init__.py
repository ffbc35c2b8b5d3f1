"""The Linux CPU fast path: opt-in, kernel-backed modules swapped into a model.

    from s2dit_mlx import kernels
    kernels.enable(pipe.dit, pipe.vae, pipe.text_encoder)   # inference on MLX's CPU backend
    ...
    kernels.disable(pipe.dit, pipe.vae, pipe.text_encoder)  # back to plain MLX

The models are plain MLX and import nothing from here. `enable(model)` walks a model the way
mlx-lm's quantization does and turns each nn.Linear, nn.SiLU, layers.GeluTanh,
layers.ScaledDotProductAttention and Wan VAE CausalConv3d / Resample into its kernel-backed
subclass (modules.py; the object and its weights stay the same), `disable(model)` turns them
back. Importing this package loads nothing, compiles nothing and writes nothing: the C++
library (cpu.py) is compiled at first use with the compiler on PATH (none: the plain path),
and each kind ("linear", "attention", ...) is timed against MLX's own op at its first use,
and used only where it is measurably faster here (choice.py). Kernel outputs are new arrays;
no array is written in place. They are invisible to autodiff: enable models for inference
only. `s2dit generate` (and the benchmarks) call `enable_on_cpu(pipe.dit, pipe.vae,
pipe.text_encoder)`: enabled when MLX runs on the CPU. S2DIT_NO_CPU_KERNELS=1 turns the
kernels off everywhere.
"""

from __future__ import annotations

import os

import mlx.nn as nn

from . import cpu
from .choice import KINDS, measure, measurements, pin, use
from .cpu import DISABLE_ENV

__all__ = [
    "DISABLE_ENV",
    "KINDS",
    "attention_scratch_bytes",
    "disable",
    "enable",
    "enable_on_cpu",
    "enabled_kinds",
    "measure",
    "measurements",
    "pin",
    "report",
    "use",
]


def _disabled_by_env() -> bool:
    return os.environ.get(DISABLE_ENV, "") not in ("", "0")


def _leaves(models) -> list[nn.Module]:
    found = []
    for model in models:
        if model is None:
            continue
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected an mlx.nn.Module, got {type(model).__name__}")
        found += [m for _, m in model.named_modules()]
    return found


def enable(*models: nn.Module | None, kinds=None) -> int:
    """Swap the modules of `models` (None entries skipped) for kernel-backed ones; returns
    how many were swapped. `kinds`: only modules that run one of these (default: all).
    Nothing is swapped when S2DIT_NO_CPU_KERNELS is set."""
    from .modules import SWAPS

    if _disabled_by_env():
        return 0
    wanted = set(KINDS if kinds is None else kinds)
    unknown = wanted - set(KINDS)
    if unknown:
        raise ValueError(f"unknown kernel kinds {sorted(unknown)} (kinds: {', '.join(KINDS)})")
    swapped = 0
    for module in _leaves(models):
        entry = SWAPS.get(type(module))
        if entry is not None and wanted & set(entry[1]):
            module.__class__ = entry[0]
            swapped += 1
    return swapped


def enable_on_cpu(*models: nn.Module | None) -> int:
    """enable(*models) when MLX computes on the CPU (its default device), else nothing: what
    `s2dit generate` and the benchmarks do with a pipeline's dit, vae and text_encoder."""
    import mlx.core as mx

    return enable(*models) if mx.default_device() == mx.cpu else 0


def disable(*models: nn.Module | None) -> int:
    """Turn the kernel-backed modules of `models` back into plain ones; returns how many."""
    from .modules import PLAIN

    restored = 0
    for module in _leaves(models):
        plain = PLAIN.get(type(module))
        if plain is not None:
            module.__class__ = plain
            restored += 1
    return restored


def enabled_kinds(*models: nn.Module | None) -> set[str]:
    """The kinds some kernel-backed module of `models` may run."""
    from .modules import SWAPS

    kinds: set[str] = set()
    for module in _leaves(models):
        for kernel, names in SWAPS.values():
            if type(module) is kernel:
                kinds.update(names)
    return kinds


def attention_scratch_bytes(
    model: nn.Module, heads: int, nq: int, nk: int, head_dim: int, threads: int | None = None
) -> float:
    """Host memory the fused attention kernel may add to a call of `model` (0: not enabled)."""
    if "attention" not in enabled_kinds(model):
        return 0.0
    threads = threads or cpu.gemm_threads()
    return cpu.attention_scratch_bytes(heads, nq, nk, head_dim, threads)


def report(measure_now: bool = False) -> list[str]:
    """Lines for `s2dit info`: how the kernels are enabled, the library, threads, and each
    kind's choice with its measured speeds (`measure_now`: measure every kind first)."""
    if _disabled_by_env():
        return [f"CPU kernels: off ({DISABLE_ENV} is set)"]
    threads = cpu.gemm_threads()
    source = next(
        (n for n in (cpu.THREADS_ENV, "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")
         if os.environ.get(n, "").strip()),
        None,
    )  # fmt: skip
    lines = [
        "CPU kernels: opt-in per model (`s2dit generate` enables them when MLX runs on the "
        f"CPU; {DISABLE_ENV}=1 turns them off)",
        f"  library: {cpu.library_status()}",
        f"  AVX-512F (needed by linear, attention, conv3d): "
        f"{'yes' if cpu.cpu_has_avx512f() else 'no'}; threads {threads}"
        + (f" (from {source})" if source else " (usable CPUs)"),
    ]
    if measure_now:
        for kind in KINDS:
            use(kind)
    done = measurements()
    if not done:
        lines.append(
            "  kinds: each measured against MLX's own op at its first use "
            "(`s2dit info --kernels` measures them now)"
        )
    lines += [f"  {m.line()}" for m in done]
    return lines
