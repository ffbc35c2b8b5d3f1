"""Pieces the attention kinds share: the token layout of a call, q/k/v projections, and the
softmax core with its block-causal chunking and streaming cache."""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..cache import ChunkSchedule, KVCache
from ..models.layers import ScaledDotProductAttention, apply_rope, rope_table


@dataclass
class TokenLayout:
    """Where the tokens of one call sit: grid, frame offset, chunking and the layer's cache."""

    grid: tuple[int, int, int]  # (frames, height, width) in tokens
    frame_offset: int
    chunk_frames: int | None  # block-causal chunking of a no-cache call; None: bidirectional
    cache: object | None = None
    update_cache: bool = False


def chunk_schedule(args) -> ChunkSchedule:
    """The model's window and sink as a ChunkSchedule."""
    return ChunkSchedule(args.window, args.sink)


def make_kv_cache(args) -> KVCache:
    """A key/value cache on the model's schedule (the streaming state of softmax kinds)."""
    return KVCache(chunk_schedule(args))


class SoftmaxCore(nn.Module):
    """Softmax attention over [B, N, H, D] tokens on a grid: RoPE, chunks, streaming cache."""

    def __init__(self, args, schedule: ChunkSchedule | None = None):
        super().__init__()
        self.head_dim = args.head_dim
        self.rope_theta = args.rope_theta
        self.schedule = schedule or chunk_schedule(args)
        self.attend = ScaledDotProductAttention()

    def __call__(self, q: mx.array, k: mx.array, v: mx.array, layout: TokenLayout) -> mx.array:
        cos, sin = rope_table(self.head_dim, layout.grid, layout.frame_offset, self.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # [B, H, N, D]
        scale = 1.0 / math.sqrt(self.head_dim)
        cache: KVCache | None = layout.cache
        if cache is not None:
            keys, values, mask = cache.attend(k, v)
            out = self.attend(q, keys, values, scale, mask)
            if layout.update_cache:
                cache.commit(k, v)
        elif layout.chunk_frames is None:
            out = self.attend(q, k, v, scale)
        else:
            out = self._block_causal(q, k, v, scale, layout)
        return out.transpose(0, 2, 1, 3)

    def _block_causal(self, q, k, v, scale, layout: TokenLayout) -> mx.array:
        frames, height, width = layout.grid
        per_chunk = layout.chunk_frames * height * width
        n_chunks = -(-frames // layout.chunk_frames)
        outs = []
        for c in range(n_chunks):
            idx = self.schedule.visible(c)
            keys = mx.concatenate([k[:, :, j * per_chunk : (j + 1) * per_chunk] for j in idx], 2)
            vals = mx.concatenate([v[:, :, j * per_chunk : (j + 1) * per_chunk] for j in idx], 2)
            outs.append(
                self.attend(q[:, :, c * per_chunk : (c + 1) * per_chunk], keys, vals, scale)
            )
        return mx.concatenate(outs, axis=2)


class ProjectedAttention(nn.Module):
    """Wan's self-attention projections: q, k, v, o linears and RMSNorm on q and k."""

    def __init__(self, args):
        super().__init__()
        dim = args.dim
        self.num_heads = args.num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(dim, eps=args.eps)
        self.norm_k = nn.RMSNorm(dim, eps=args.eps)

    def qkv(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Projected, normed q, k and v as [B, N, dim]."""
        return self.norm_q(self.q(x)), self.norm_k(self.k(x)), self.v(x)

    def heads(self, a: mx.array) -> mx.array:
        """[B, N, dim] -> [B, N, H, D]."""
        return a.reshape(*a.shape[:2], self.num_heads, -1)


def projection_flops(args, tokens: int) -> int:
    """FLOPs of the q, k, v and o projections of `tokens` tokens."""
    return 2 * tokens * args.dim * args.dim * 4


def rope_flops(args, tokens: int) -> int:
    """RoPE on q and k as the Core ML graph computes it (a pair-rotation matmul per tensor)."""
    return 2 * tokens * args.dim * args.head_dim * 2


def softmax_flops(args, queries: int, keys: int) -> int:
    """Scores and mixing of softmax attention."""
    return 2 * queries * keys * args.dim * 2
