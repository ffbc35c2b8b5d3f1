"""Kernel-backed subclasses of the modules the models are built from, and the swap table.

Each subclass computes what its base class computes; where the CPU kernels apply (float32, MLX
on the CPU, big enough, the kind chosen by choice.use) it returns the kernel's new array, else
it calls the base class. enable() turns a model's plain modules into these by changing their
class, disable() turns them back: the objects, their weights and everything that refers to
them (the VAE's conv histories are keyed by module) stay the same.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..models import layers, wan_vae
from . import choice, cpu


class _Eager:
    """Marks a kernel-backed module: it evaluates its input, so a traced graph cannot hold it
    (s2dit_mlx.generation reads `computes_eagerly`)."""

    computes_eagerly = True


class KernelLinear(_Eager, nn.Linear):
    """nn.Linear, its product on the kernels' GEMM ("linear")."""

    def __call__(self, x: mx.array) -> mx.array:
        bias = self.get("bias")
        if cpu.linear_applies(x, self.weight, bias) and choice.use("linear"):
            out = cpu.linear(x, self.weight, bias)
            if out is not None:
                return out
        return super().__call__(x)


class KernelSiLU(_Eager, nn.SiLU):
    """nn.SiLU on the vectorised kernel ("silu")."""

    def __call__(self, x: mx.array) -> mx.array:
        if cpu.elementwise_applies(x) and choice.use("silu"):
            out = cpu.silu(x)
            if out is not None:
                return out
        return super().__call__(x)


class KernelGeluTanh(_Eager, layers.GeluTanh):
    """layers.GeluTanh on the vectorised kernel ("gelu_tanh")."""

    def __call__(self, x: mx.array) -> mx.array:
        if cpu.elementwise_applies(x) and choice.use("gelu_tanh"):
            out = cpu.gelu_tanh(x)
            if out is not None:
                return out
        return super().__call__(x)


class KernelAttention(_Eager, layers.ScaledDotProductAttention):
    """Unmasked softmax attention fused on the kernels' GEMM ("attention"), else with the
    softmax kernel between MLX's products ("softmax")."""

    def __call__(
        self, q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None = None
    ) -> mx.array:
        if mask is None and cpu.eligible(q, cpu.MIN_ELEMENTS):
            out = None
            if cpu.attention_applies(q, k, v) and choice.use("attention"):
                out = cpu.attention(q, k, v, scale)
            if out is None and choice.use("softmax"):
                budget = layers.ATTENTION_SCORE_BUDGET
                out = cpu.softmax_attention(q, k, v, scale, budget)
            if out is not None:
                return out
        return super().__call__(q, k, v, scale, mask)


class KernelCausalConv3d(_Eager, wan_vae.CausalConv3d):
    """The Wan VAE's causal conv as a direct convolution ("conv3d") that reads the conv's
    history and zero padding in place (nothing concatenated, padded or unfolded)."""

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        keep = self.kt - 1
        # (A chunk shorter than the history falls back: the kernel keeps no history itself.)
        if self.weight.shape[1:4] != (1, 1, 1) and x.shape[1] >= keep:
            history = cache.of(self, keep) if cache is not None and keep else None
            past = history.history if history is not None else None
            args = (x, self.weight, self.bias, past, keep > 0, (self.ph, self.pw))
            if cpu.conv3d_applies(*args) and choice.use("conv3d"):
                out = cpu.conv3d(*args)
                if out is not None:
                    if history is not None:
                        history.update(x)  # its last `keep` frames, as the base class keeps
                    return out
        return super().__call__(x, cache)


class KernelResample(_Eager, wan_vae.Resample):
    """Wan's 2x upsampling + 3x3 conv as one direct convolution that reads the frames before
    upsampling ("conv3d"); downsampling is the base class's."""

    def _spatial(self, x: mx.array) -> mx.array:
        if self.mode.startswith("upsample"):
            conv = self.resample[1]
            args = (x, conv.weight[:, None], conv.bias, None, False, (1, 1), 2)
            if cpu.conv3d_applies(*args) and choice.use("conv3d"):
                out = cpu.conv3d(*args)
                if out is not None:
                    return out
        return super()._spatial(x)


# plain class -> (kernel-backed subclass, the kinds it may run)
SWAPS: dict[type, tuple[type, tuple[str, ...]]] = {
    nn.Linear: (KernelLinear, ("linear",)),
    nn.SiLU: (KernelSiLU, ("silu",)),
    layers.GeluTanh: (KernelGeluTanh, ("gelu_tanh",)),
    layers.ScaledDotProductAttention: (KernelAttention, ("attention", "softmax")),
    wan_vae.CausalConv3d: (KernelCausalConv3d, ("conv3d",)),
    wan_vae.Resample: (KernelResample, ("conv3d",)),
}
PLAIN: dict[type, type] = {kernel: plain for plain, (kernel, _) in SWAPS.items()}
