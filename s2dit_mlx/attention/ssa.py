"""`ssa`: Stride Self-Attention, softmax attention on an s x s pooled token grid.

q, k and v are projected at full resolution (the teacher's weights), pooled per s x s patch
with per-channel weights (a depthwise linear, the mean at init), attended on the s^2-times
shorter sequence, copied back per position with per-channel weights (a copy at init) and
projected by o. Streaming state: a KVCache at the pooled resolution.
"""

from __future__ import annotations

import mlx.core as mx

from ..coreml.shapes import kv_state_specs
from .common import (
    ProjectedAttention,
    SoftmaxCore,
    TokenLayout,
    make_kv_cache,
    projection_flops,
    rope_flops,
    softmax_flops,
)
from .registry import AttentionKind, CallShape, register_attention


class StrideSelfAttention(ProjectedAttention):
    """SSA: softmax attention on tokens pooled over s x s patches, then shuffled back."""

    def __init__(self, args):
        super().__init__(args)
        s2 = args.ssa_stride**2
        self.stride = args.ssa_stride
        self.core = SoftmaxCore(args)
        # Depthwise mixing of the s*s positions of each patch (mean pooling / copy at init).
        self.down_q = mx.full((s2, args.dim), 1.0 / s2)
        self.down_k = mx.full((s2, args.dim), 1.0 / s2)
        self.down_v = mx.full((s2, args.dim), 1.0 / s2)
        self.up = mx.ones((s2, args.dim))

    def _unshuffle(self, a: mx.array, grid: tuple[int, int, int]) -> mx.array:
        frames, height, width = grid
        s = self.stride
        a = a.reshape(a.shape[0], frames, height // s, s, width // s, s, a.shape[-1])
        a = a.transpose(0, 1, 2, 4, 3, 5, 6)
        return a.reshape(a.shape[0], frames, height // s, width // s, s * s, a.shape[-1])

    def __call__(self, x: mx.array, layout: TokenLayout) -> mx.array:
        frames, height, width = layout.grid
        s = self.stride
        low_grid = (frames, height // s, width // s)
        pooled = [
            (self._unshuffle(a, layout.grid) * w).sum(axis=-2).reshape(x.shape[0], -1, x.shape[-1])
            for a, w in zip(self.qkv(x), (self.down_q, self.down_k, self.down_v), strict=True)
        ]
        low = TokenLayout(
            low_grid, layout.frame_offset, layout.chunk_frames, layout.cache, layout.update_cache
        )
        out = self.core(*(self.heads(a) for a in pooled), low)  # [B, n, H, D]
        out = out.reshape(x.shape[0], frames, height // s, width // s, 1, x.shape[-1]) * self.up
        out = out.reshape(x.shape[0], frames, height // s, width // s, s, s, x.shape[-1])
        out = out.transpose(0, 1, 2, 4, 3, 5, 6).reshape(x.shape)
        return self.o(out)


def flops(args, shape: CallShape) -> int:
    """Full-resolution projections; RoPE and softmax on the pooled tokens."""
    m = shape.tokens // args.ssa_stride**2
    return (
        projection_flops(args, shape.tokens)
        + rope_flops(args, m)
        + softmax_flops(args, m, m * (shape.past_chunks + 1))
    )


def coreml_states(args, shape: CallShape, layer: int) -> list:
    """Key and value ring buffers at the pooled resolution."""
    return kv_state_specs(args, layer, shape.tokens // args.ssa_stride**2, shape.past_chunks)


def emit_coreml(ctx, args, layer: int, x, grid, shapes):
    """MIL of StrideSelfAttention: pool, attend over the ring-buffer state, shuffle back."""
    import numpy as np

    from ..coreml import emit

    mb = emit.mb
    prefix = f"blocks.{layer}.self_attn"
    frames, height, width = grid
    s = args.ssa_stride
    hl, wl = height // s, width // s
    dim = args.dim
    pooled = []
    qkv = emit.qkv(ctx, args, x, prefix)
    for a, name in zip(qkv, ("down_q", "down_k", "down_v"), strict=True):
        weight = ctx.weights[f"{prefix}.{name}"].reshape(1, s, 1, s, dim)
        a = mb.reshape(x=a, shape=[frames * hl, s, wl, s, dim])
        a = mb.reduce_sum(x=mb.mul(x=a, y=ctx.w(f"{prefix}.{name}", weight)), axes=[1, 3])
        a = mb.reshape(x=a, shape=[1, frames * hl * wl, dim])
        pooled.append(emit.split_heads(a, args.num_heads))
    q, k, v = pooled
    tables = emit.rope_tables(ctx, args, (frames, hl, wl))
    q, k = emit.apply_rope(ctx, q, tables), emit.apply_rope(ctx, k, tables)
    out = emit.merge_heads(emit.softmax_with_window(ctx, args, layer, q, k, v, shapes))
    out = mb.reshape(x=out, shape=[frames * hl, 1, wl, 1, dim])
    up = np.asarray(ctx.weights[f"{prefix}.up"]).reshape(1, s, 1, s, dim)
    out = mb.mul(x=out, y=ctx.w(f"{prefix}.up", up))
    out = mb.reshape(x=out, shape=[1, frames * height * width, dim])
    return emit.linear(ctx, out, prefix + ".o")


KIND = register_attention(
    AttentionKind(
        name="ssa",
        module=StrideSelfAttention,
        make_cache=make_kv_cache,
        flops=flops,
        coreml_states=coreml_states,
        emit_coreml=emit_coreml,
        spatial_stride=lambda args: args.ssa_stride,
        spatial_reason=lambda args: f"SSA stride {args.ssa_stride}",
        softmax=True,
    )
)
