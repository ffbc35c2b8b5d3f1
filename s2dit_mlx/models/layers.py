"""Building blocks shared by the S2DiT and Wan models: 3D RoPE, CPU-friendly attention.

Plain MLX ops only. Attention and the tanh GELU are modules, so that the opt-in Linux CPU
path (s2dit_mlx.kernels) can swap in kernel-backed subclasses, as it does for nn.Linear.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np

# Largest score matrix (elements, all heads and batch together) one attention call may hold.
# MLX's CPU attention is unfused and materialises every score, so we tile the queries.
ATTENTION_SCORE_BUDGET = 1 << 23  # 32 MB of float32 scores


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Split head_dim over (t, h, w) as Wan does: [d - 4(d//6), 2(d//6), 2(d//6)]."""
    sixth = head_dim // 6
    return head_dim - 4 * sixth, 2 * sixth, 2 * sixth


@lru_cache(maxsize=64)
def _rope_table(
    head_dim: int, frames: int, height: int, width: int, frame_offset: int, theta: float
) -> tuple[mx.array, mx.array]:
    angles = []
    positions = np.meshgrid(
        np.arange(frame_offset, frame_offset + frames),
        np.arange(height),
        np.arange(width),
        indexing="ij",
    )
    for axis_dim, pos in zip(rope_axis_dims(head_dim), positions, strict=True):
        freqs = 1.0 / theta ** (np.arange(0, axis_dim, 2, dtype=np.float64) / axis_dim)
        angles.append(pos.reshape(-1, 1).astype(np.float64) * freqs[None, :])
    angle = np.concatenate(angles, axis=1)  # [tokens, head_dim // 2]
    return mx.array(np.cos(angle).astype(np.float32)), mx.array(np.sin(angle).astype(np.float32))


def rope_table(
    head_dim: int, grid: tuple[int, int, int], frame_offset: int = 0, theta: float = 10000.0
) -> tuple[mx.array, mx.array]:
    """cos/sin [tokens, head_dim/2] for a (frames, height, width) token grid, frames from offset."""
    return _rope_table(head_dim, *grid, frame_offset, theta)


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate interleaved pairs of x [B, N, H, D] (Wan's complex multiply) by a table [N, D/2]."""
    shape = x.shape
    pairs = x.astype(mx.float32).reshape(*shape[:-1], shape[-1] // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    out = mx.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(shape).astype(x.dtype)


def attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None = None
) -> mx.array:
    """Softmax attention on [B, H, L, D] inputs, tiled over queries to bound memory on the CPU.

    `mask`: an optional boolean [Lk] (True: the key is visible to every query).
    """
    batch, heads, q_len, _ = q.shape
    k_len = k.shape[2]
    tile = max(1, ATTENTION_SCORE_BUDGET // (batch * heads * k_len))
    if mask is not None:
        mask = mask.reshape(1, 1, 1, k_len)
    if mx.default_device() == mx.gpu or batch * heads * q_len * k_len <= ATTENTION_SCORE_BUDGET:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    # Callers pass transposed views; each tile would copy them again (twice the time at 4680
    # tokens), so make them contiguous once.
    q, k, v = mx.contiguous(q), mx.contiguous(k), mx.contiguous(v)
    outs = []
    for i in range(0, q_len, tile):
        q_tile = q[:, :, i : i + tile]
        if outs:
            # Make each tile wait for the previous one, so only one score matrix is alive.
            q_tile = mx.depends(q_tile, outs[-1])
        outs.append(mx.fast.scaled_dot_product_attention(q_tile, k, v, scale=scale, mask=mask))
    return mx.concatenate(outs, axis=2)


class ScaledDotProductAttention(nn.Module):
    """`attention()` as a (parameter-free) module: what the attention layers call."""

    def __call__(
        self, q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None = None
    ) -> mx.array:
        return attention(q, k, v, scale, mask)


class GeluTanh(nn.Module):
    """GELU, tanh approximation (nn.GELU(approx="tanh"))."""

    def __call__(self, x: mx.array) -> mx.array:
        return nn.gelu_approx(x)
