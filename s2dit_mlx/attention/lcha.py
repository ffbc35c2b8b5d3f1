"""`lcha`: LinConv Hybrid Attention, a gated sum of softplus linear attention and a causal
depthwise 3D convolution on v. Linear in the tokens; its streaming state does not grow.

Choices the paper leaves open (documented in docs/architecture.md, all config fields):
- feature map phi(x) = softplus(W x + b) per head on the QK-normed q and k, W shared by q and k
  (`lcha_feature_dim`, None: head_dim);
- RoPE rotates phi(q), phi(k) in the numerator only, so the denominator stays positive
  (`lcha_rope`);
- the conv is a causal depthwise 3D conv over (t, h, w) (`lcha_conv_kernel`), done as a fused
  sum of shifted taps (MLX has no grouped conv3d), then a linear channel mix (`conv_proj`);
- fuse: o(a * linear + (1 - a) * conv), a = sigmoid(gate) per channel (gate starts at 0).
Streaming state: running sums (S, z) and the conv's last kt - 1 frames (LinearAttentionCache).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from ..cache import ConvHistory, LinearAttentionCache
from ..coreml.shapes import StateSpec
from ..models.layers import apply_rope, rope_table
from .common import ProjectedAttention, TokenLayout, projection_flops
from .registry import AttentionKind, CallShape, register_attention


def softplus(x: mx.array) -> mx.array:
    """log(1 + e^x), in the stable form that is ~30% faster than nn.softplus on the CPU."""
    return mx.maximum(x, 0) + mx.log1p(mx.exp(-mx.abs(x)))


@mx.compile
def depthwise_causal_conv3d(padded: mx.array, weight: mx.array) -> mx.array:
    """Depthwise 3D conv as a sum of shifted taps, fused by mx.compile (no grouped conv3d in MLX).

    padded: [B, T + kt - 1, h, w, C], already holding the kt - 1 past frames; weight: [C, kt, kh, kw].
    Zero 'same' padding in h and w. The fused sum is ~3.5x faster than grouped conv2d per tap on CPU.
    """
    _, kt, kh, kw = weight.shape
    frames = padded.shape[1] - kt + 1
    height, width = padded.shape[2:4]
    # Like PyTorch padding='same': an even kernel's extra zero goes after (bottom/right).
    pad_h, pad_w = ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2)
    padded = mx.pad(padded, [(0, 0), (0, 0), pad_h, pad_w, (0, 0)])
    out = None
    for a in range(kt):
        for b in range(kh):
            for c in range(kw):
                tap = padded[:, a : a + frames, b : b + height, c : c + width] * weight[:, a, b, c]
                out = tap if out is None else out + tap
    return out


class LinConvAttention(ProjectedAttention):
    """LCHA: gated sum of softplus linear attention and a causal depthwise 3D conv on v."""

    def __init__(self, args):
        super().__init__(args)
        self.args = args
        feature_dim = args.lcha_feature_dim or args.head_dim
        kt, kh, kw = args.lcha_conv_kernel
        self.feature_map = nn.Linear(args.head_dim, feature_dim)
        # Depthwise kernel in MLX conv layout (O, D, H, W, I) with I = 1.
        scale = 1.0 / math.sqrt(kt * kh * kw)
        self.conv_weight = mx.random.uniform(-scale, scale, (args.dim, kt, kh, kw, 1))
        self.conv_bias = mx.zeros((args.dim,))
        self.conv_proj = nn.Linear(args.dim, args.dim)
        self.gate = mx.zeros((args.dim,))

    def _linear_path(self, q: mx.array, k: mx.array, v: mx.array, layout: TokenLayout):
        args = self.args
        fq = softplus(self.feature_map(q).astype(mx.float32))  # [B, N, H, F]
        fk = softplus(self.feature_map(k).astype(mx.float32))
        v = v.astype(mx.float32)
        if args.lcha_rope:
            cos, sin = rope_table(args.head_dim, layout.grid, layout.frame_offset, args.rope_theta)
            rq, rk = apply_rope(fq, cos, sin), apply_rope(fk, cos, sin)
        else:
            rq, rk = fq, fk
        fq, fk, rq, rk, v = (a.transpose(0, 2, 1, 3) for a in (fq, fk, rq, rk, v))  # [B,H,N,*]
        state: LinearAttentionCache | None = layout.cache
        frames, height, width = layout.grid
        if layout.chunk_frames is None or state is not None:
            kv = rk.swapaxes(-1, -2) @ v  # [B, H, F, D]
            k_sum = fk.sum(axis=2)  # [B, H, F]
            if state is not None and state.kv is not None:
                num = rq @ (state.kv + kv)
                den = fq @ (state.k_sum + k_sum)[..., None]
            else:
                num = rq @ kv
                den = fq @ k_sum[..., None]
            out = num / (den + args.lcha_eps)
            return out, (kv, k_sum)
        # Block-causal: each chunk sees the running sums up to and including itself.
        per_chunk = layout.chunk_frames * height * width
        outs, kv_run, k_run = [], None, None
        for start in range(0, frames * height * width, per_chunk):
            sl = slice(start, start + per_chunk)
            kv = rk[:, :, sl].swapaxes(-1, -2) @ v[:, :, sl]
            k_sum = fk[:, :, sl].sum(axis=2)
            kv_run = kv if kv_run is None else kv_run + kv
            k_run = k_sum if k_run is None else k_run + k_sum
            den = fq[:, :, sl] @ k_run[..., None]
            outs.append((rq[:, :, sl] @ kv_run) / (den + args.lcha_eps))
        return mx.concatenate(outs, axis=2), None

    def _conv_path(self, v: mx.array, layout: TokenLayout) -> tuple[mx.array, mx.array]:
        """Causal depthwise conv3d of v [B, T, h, w, C]; returns output and the padded input."""
        state: LinearAttentionCache | None = layout.cache
        history = (
            state.conv if state is not None else ConvHistory(self.args.lcha_conv_kernel[0] - 1)
        )
        padded = history.prepend(v)
        weight = self.conv_weight[..., 0].astype(v.dtype)
        return depthwise_causal_conv3d(padded, weight) + self.conv_bias.astype(v.dtype), padded

    def __call__(self, x: mx.array, layout: TokenLayout) -> mx.array:
        q, k, v = self.qkv(x)
        linear, sums = self._linear_path(self.heads(q), self.heads(k), self.heads(v), layout)
        linear = linear.transpose(0, 2, 1, 3).reshape(x.shape)
        conv, padded = self._conv_path(v.reshape(x.shape[0], *layout.grid, -1), layout)
        conv = self.conv_proj(conv.reshape(x.shape))
        if layout.cache is not None and layout.update_cache:
            layout.cache.commit(*sums, padded)
        a = mx.sigmoid(self.gate.astype(mx.float32))
        return self.o((a * linear + (1 - a) * conv.astype(mx.float32)).astype(x.dtype))


def make_cache(args) -> LinearAttentionCache:
    """Running sums and the conv's last kt - 1 frames."""
    return LinearAttentionCache(args.lcha_conv_kernel[0] - 1)


def flops(args, shape: CallShape) -> int:
    """Projections, feature maps, the linear-attention products, RoPE on phi, conv and mix."""
    n, d, heads = shape.tokens, args.dim, args.num_heads
    feature = args.lcha_feature_dim or args.head_dim
    kt, kh, kw = args.lcha_conv_kernel
    return (
        projection_flops(args, n)
        + 2 * n * d * feature * 2  # feature maps of q and k (per head, head_dim -> F)
        + 2 * n * feature * d * 2  # phi(k)^T v and phi(q) S
        + 2 * n * feature * heads  # denominator phi(q) z
        + 2 * n * heads * feature * feature * 2 * int(args.lcha_rope)  # RoPE on phi
        + 2 * n * d * kt * kh * kw  # depthwise conv
        + 2 * n * d * d  # conv_proj
    )


def coreml_states(args, shape: CallShape, layer: int) -> list:
    """Running means of phi(k) v^T and phi(k), and the conv's last kt - 1 frames."""
    heads, hd = args.num_heads, args.head_dim
    feature = args.lcha_feature_dim or hd
    kt = args.lcha_conv_kernel[0]
    specs = [
        StateSpec(f"l{layer}_kv_mean", (1, heads, feature, hd), layer, "kv_mean"),
        StateSpec(f"l{layer}_k_mean", (1, heads, feature, 1), layer, "k_mean"),
    ]
    if kt > 1:
        shape5 = (1, args.dim, kt - 1, shape.height, shape.width)
        specs.append(StateSpec(f"l{layer}_conv_frames", shape5, layer, "conv_frames"))
    return specs


def emit_coreml(ctx, args, layer: int, x, grid, shapes):
    """MIL of LCHA: running means as state (fp16 safe), causal depthwise conv with its frames."""
    import numpy as np

    from ..coreml import emit

    mb = emit.mb
    prefix = f"blocks.{layer}.self_attn"
    frames, height, width = grid
    n_tok = frames * height * width
    heads, dim = args.num_heads, args.dim
    q, k, v = emit.qkv(ctx, args, x, prefix)
    fq = emit.softplus_features(ctx, q, prefix, heads)
    fk = emit.softplus_features(ctx, k, prefix, heads)
    vh = emit.split_heads(v, heads)
    if args.lcha_rope:
        tables = emit.rope_tables(ctx, args, grid)
        rq, rk = emit.apply_rope(ctx, fq, tables), emit.apply_rope(ctx, fk, tables)
    else:
        rq, rk = fq, fk

    sc = emit.chunk_scalars(ctx)
    w_past, w_cur = sc["past"], sc["inv"]
    if ctx.dtype == "fp16":
        w_past, w_cur = mb.cast(x=w_past, dtype="fp16"), mb.cast(x=w_cur, dtype="fp16")
    kv_state, k_state = ctx.states[f"l{layer}_kv_mean"], ctx.states[f"l{layer}_k_mean"]
    # Chunk means first (O(1) values in fp16), then the running mean over all chunks.
    kv_chunk = mb.matmul(x=mb.mul(x=rk, y=ctx.c(1.0 / n_tok)), y=vh, transpose_x=True)
    k_chunk = mb.reduce_mean(x=fk, axes=[2], keep_dims=True)  # [1, H, 1, F]
    k_chunk = mb.reshape(x=k_chunk, shape=[1, heads, fk.shape[-1], 1])
    kv_mean = mb.add(
        x=mb.mul(x=ctx.to_compute(mb.read_state(input=kv_state)), y=w_past),
        y=mb.mul(x=kv_chunk, y=w_cur),
    )
    if ctx.write:
        mb.coreml_update_state(state=kv_state, value=ctx.to_state(kv_mean))
    k_mean = mb.add(
        x=mb.mul(x=ctx.to_compute(mb.read_state(input=k_state)), y=w_past),
        y=mb.mul(x=k_chunk, y=w_cur),
    )
    if ctx.write:
        mb.coreml_update_state(state=k_state, value=ctx.to_state(k_mean))
    num = mb.matmul(x=rq, y=kv_mean)
    eps = mb.mul(x=w_cur, y=ctx.c(args.lcha_eps / n_tok))
    den = mb.add(x=mb.matmul(x=fq, y=k_mean), y=eps)
    linear_out = emit.merge_heads(mb.real_div(x=num, y=den))

    kt, kh, kw = args.lcha_conv_kernel
    v5 = mb.transpose(
        x=mb.reshape(x=v, shape=[1, frames, height, width, dim]), perm=[0, 4, 1, 2, 3]
    )
    if kt > 1:
        conv_state = ctx.states[f"l{layer}_conv_frames"]
        past = ctx.to_compute(mb.read_state(input=conv_state))
        padded = mb.concat(values=[past, v5], axis=2)  # [1, C, kt-1+f, h, w]
        if ctx.write:
            last = mb.slice_by_index(
                x=padded, begin=[0, 0, frames, 0, 0], end=[1, dim, frames + kt - 1, height, width]
            )
            mb.coreml_update_state(state=conv_state, value=ctx.to_state(last))
    else:
        padded = v5
    weight = ctx.weights[f"{prefix}.conv_weight"].transpose(0, 4, 1, 2, 3)  # [C, 1, kt, kh, kw]
    conv = mb.conv(
        x=padded,
        weight=ctx.w(f"{prefix}.conv_weight", weight),
        bias=ctx.w(f"{prefix}.conv_bias"),
        strides=[1, 1, 1],
        pad_type="custom",
        # Like PyTorch 'same' (and our MLX conv): an even kernel's extra zero goes after.
        pad=[0, 0, (kh - 1) // 2, kh // 2, (kw - 1) // 2, kw // 2],
        dilations=[1, 1, 1],
        groups=dim,
    )
    conv = mb.reshape(x=mb.transpose(x=conv, perm=[0, 2, 3, 4, 1]), shape=[1, n_tok, dim])
    conv = emit.linear(ctx, conv, prefix + ".conv_proj")
    gate = ctx.weights[f"{prefix}.gate"].astype(np.float64)
    a = (1.0 / (1.0 + np.exp(-gate))).astype(np.float32)
    mixed = mb.add(x=mb.mul(x=linear_out, y=ctx.c(a)), y=mb.mul(x=conv, y=ctx.c(1.0 - a)))
    return emit.linear(ctx, mixed, prefix + ".o")


KIND = register_attention(
    AttentionKind(
        name="lcha",
        module=LinConvAttention,
        make_cache=make_cache,
        flops=flops,
        coreml_states=coreml_states,
        emit_coreml=emit_coreml,
    )
)
