"""`full`: Wan's softmax self-attention (3D RoPE, QK RMSNorm) over a window of chunks.

The teacher's attention; quadratic in the tokens it sees. Streaming state: a KVCache.
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


class FullAttention(ProjectedAttention):
    """Wan self-attention: q, k, v, o projections, RMSNorm on q and k, 3D RoPE."""

    def __init__(self, args):
        super().__init__(args)
        self.core = SoftmaxCore(args)

    def __call__(self, x: mx.array, layout: TokenLayout) -> mx.array:
        q, k, v = (self.heads(a) for a in self.qkv(x))
        out = self.core(q, k, v, layout)
        return self.o(out.reshape(x.shape))


def flops(args, shape: CallShape) -> int:
    """Projections, RoPE and softmax over the chunk and its kept chunks."""
    n = shape.tokens
    return (
        projection_flops(args, n)
        + rope_flops(args, n)
        + softmax_flops(args, n, n * (shape.past_chunks + 1))
    )


def coreml_states(args, shape: CallShape, layer: int) -> list:
    """Key and value ring buffers at full token resolution."""
    return kv_state_specs(args, layer, shape.tokens, shape.past_chunks)


def emit_coreml(ctx, args, layer: int, x, grid, shapes):
    """MIL of FullAttention over the ring-buffer state."""
    from ..coreml import emit

    prefix = f"blocks.{layer}.self_attn"
    q, k, v = (emit.split_heads(a, args.num_heads) for a in emit.qkv(ctx, args, x, prefix))
    tables = emit.rope_tables(ctx, args, grid)
    q, k = emit.apply_rope(ctx, q, tables), emit.apply_rope(ctx, k, tables)
    out = emit.softmax_with_window(ctx, args, layer, q, k, v, shapes)
    return emit.linear(ctx, emit.merge_heads(out), prefix + ".o")


KIND = register_attention(
    AttentionKind(
        name="full",
        module=FullAttention,
        make_cache=make_kv_cache,
        flops=flops,
        coreml_states=coreml_states,
        emit_coreml=emit_coreml,
        softmax=True,
    )
)
