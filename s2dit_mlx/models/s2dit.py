"""S2DiT: a Wan-style diffusion transformer whose self-attention is chosen per layer.

Block types come from the attention registry (s2dit_mlx/attention/): `full` (the Wan
teacher's softmax attention), `lcha` (LinConv Hybrid Attention) and `ssa` (Stride
Self-Attention), or any kind registered there.

Parameter names follow Wan's original checkpoint layout wherever Wan has the parameter,
so a student can be initialised from a teacher by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import mlx.core as mx
import mlx.nn as nn

from ..attention import TokenLayout, attention_kind
from ..attention.common import ProjectedAttention
from ..cache import StreamCache
from ..config import ConfigBase
from ..errors import S2DiTError
from ..validate import check_field_types
from .layers import GeluTanh, ScaledDotProductAttention


@dataclass
class ModelArgs(ConfigBase):
    """Configuration of an S2DiT (defaults: Wan-1.3B widths with a sandwich of LCHA and SSA)."""

    config_name: ClassVar[str] = "dit config"

    model_type: str = "s2dit"
    in_dim: int = 16
    out_dim: int = 16
    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256
    text_dim: int = 4096
    num_heads: int = 12
    layers: list[str] = field(default_factory=lambda: ["lcha"] * 10 + ["ssa"] * 10 + ["lcha"] * 10)
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    cross_attn_norm: bool = True
    # Wan zero-pads the text context to this many tokens before the text embedding.
    text_len: int = 512
    rope_theta: float = 10000.0
    # Streaming: latent frames per chunk; softmax layers keep `sink` first chunks plus a rolling
    # window of `window` chunks (the current one included); None keeps every chunk.
    frames_per_chunk: int = 3
    window: int | None = None
    sink: int = 0
    # LCHA (choices the paper leaves open; docs/architecture.md, "LCHA"):
    # feature map phi(x) = softplus(W x + b) on QK-normed q and k, per head, W shared by q and k;
    lcha_feature_dim: int | None = None  # None: head_dim (needed for RoPE on phi)
    # RoPE rotates phi(q), phi(k) in the numerator only, so the denominator stays positive;
    lcha_rope: bool = True
    # causal depthwise 3D conv on v over (t, h, w), done as a fused sum of shifted taps
    # (MLX has no grouped conv3d); then a linear channel mix;
    lcha_conv_kernel: tuple[int, int, int] = (3, 3, 3)
    lcha_eps: float = 1e-6
    # fuse: O(a * linear + (1 - a) * conv), a = sigmoid(gate) per channel (gate starts at 0).
    # SSA (INFERRED): q, k, v are projected at full resolution with the teacher's weights, then
    # pixel-unshuffled by stride s and mixed per channel over the s*s positions (a depthwise
    # linear, initialised to the mean); attention runs on the short sequence; the output is
    # pixel-shuffled back with per-channel weights (initialised to copy) before the o projection.
    ssa_stride: int = 2

    @classmethod
    def from_dict(cls, params: dict) -> ModelArgs:
        """Build from a config dict (ConfigBase: unknown keys ignored, fields type-checked)."""
        args = super().from_dict(params)
        args.validate()
        return args

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def validate(self) -> None:
        """Raise S2DiTError naming the first inconsistent field."""
        check_field_types(self, "dit config")
        for kind in self.layers:
            attention_kind(kind)  # S2DiTError naming the known kinds
        if not self.layers:
            raise S2DiTError("layers is empty: the model needs at least one block")
        if self.dim % self.num_heads or self.head_dim % 2:
            raise S2DiTError(f"dim {self.dim} must split into {self.num_heads} heads of even size")
        if self.frames_per_chunk < 1:
            raise S2DiTError("frames_per_chunk must be at least 1")
        if self.window is not None and self.window < 1:
            raise S2DiTError("window must be at least 1 chunk (or null for unbounded)")
        if self.sink < 0:
            raise S2DiTError("sink must be >= 0")
        if self.ssa_stride < 1:
            raise S2DiTError("ssa_stride must be >= 1")
        if self.lcha_rope and self.lcha_feature_dim not in (None, self.head_dim):
            raise S2DiTError("lcha_feature_dim must equal head_dim when lcha_rope is on")
        if len(self.patch_size) != 3 or self.patch_size[0] != 1:
            raise S2DiTError("patch_size must be (1, ph, pw)")

    def spatial_multiple(self) -> int:
        """Latent height/width must be multiples of this: patch x the kinds' token strides."""
        return max(self.patch_size[1], self.patch_size[2]) * self.token_stride()

    def token_stride(self) -> int:
        """Token height/width must be multiples of this (e.g. the SSA stride)."""
        stride = 1
        for kind in set(self.layers):
            stride = math.lcm(stride, attention_kind(kind).spatial_stride(self))
        return stride

    def spatial_reasons(self) -> list[str]:
        """What makes up spatial_multiple, for messages: ["patch 2", "SSA stride 2"]."""
        reasons = [f"patch {max(self.patch_size[1], self.patch_size[2])}"]
        for kind in dict.fromkeys(self.layers):
            reason = attention_kind(kind).spatial_reason(self)
            if reason:
                reasons.append(reason)
        return reasons


def sinusoidal_embedding(t: mx.array, dim: int) -> mx.array:
    """Wan's timestep embedding: [cos, sin] of t * 10000^(-i/half)."""
    half = dim // 2
    freqs = mx.power(10000.0, -mx.arange(half, dtype=mx.float32) / half)
    angles = t.astype(mx.float32)[..., None] * freqs
    return mx.concatenate([mx.cos(angles), mx.sin(angles)], axis=-1)


def layer_norm(x: mx.array, eps: float) -> mx.array:
    """LayerNorm without affine parameters, computed in float32."""
    return mx.fast.layer_norm(x.astype(mx.float32), None, None, eps)


class CrossAttention(ProjectedAttention):
    """Wan text cross-attention: q from the video tokens, k and v from the text."""

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.attend = ScaledDotProductAttention()

    def keys_values(self, context: mx.array) -> tuple[mx.array, mx.array]:
        """The text's keys and values [B, H, L, D] (a stream computes them once: TextCache)."""
        b, _, d = context.shape
        k = self.norm_k(self.k(context)).reshape(b, -1, self.num_heads, d // self.num_heads)
        v = self.v(context).reshape(b, -1, self.num_heads, d // self.num_heads)
        return k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def __call__(
        self, x: mx.array, context: mx.array, keys_values: tuple | None = None
    ) -> mx.array:
        b, n, d = x.shape
        q = self.norm_q(self.q(x)).reshape(b, n, self.num_heads, -1).transpose(0, 2, 1, 3)
        k, v = keys_values if keys_values is not None else self.keys_values(context)
        scale = 1.0 / math.sqrt(d // self.num_heads)
        out = self.attend(q, k, v, scale)
        return self.o(out.transpose(0, 2, 1, 3).reshape(b, n, d))


class Block(nn.Module):
    """Wan block with a swappable self-attention and AdaLN modulation."""

    def __init__(self, args: ModelArgs, block_type: str):
        super().__init__()
        self.block_type = block_type
        self.eps = args.eps
        self.self_attn = attention_kind(block_type).module(args)
        self.norm3 = nn.LayerNorm(args.dim, eps=args.eps) if args.cross_attn_norm else None
        self.cross_attn = CrossAttention(args)
        self.ffn = [nn.Linear(args.dim, args.ffn_dim), GeluTanh()]
        self.ffn.append(nn.Linear(args.ffn_dim, args.dim))
        self.modulation = mx.random.normal((1, 6, args.dim)) / math.sqrt(args.dim)

    def __call__(
        self,
        x: mx.array,
        e: mx.array,
        context: mx.array,
        layout: TokenLayout,
        text_kv: tuple | None = None,
    ) -> mx.array:
        # x: [B, T, S, dim]; e: [B, T, 6, dim] per-frame modulation (float32); text_kv: the
        # cross-attention's keys and values when a stream already computed them.
        mod = self.modulation.astype(mx.float32) + e
        shift1, scale1, gate1, shift2, scale2, gate2 = (mod[:, :, i : i + 1] for i in range(6))
        b, t, s, d = x.shape
        dtype = x.dtype
        h = (layer_norm(x, self.eps) * (1 + scale1) + shift1).astype(dtype)
        y = self.self_attn(h.reshape(b, t * s, d), layout).reshape(x.shape)
        x = (x + y * gate1).astype(dtype)
        h = x if self.norm3 is None else self.norm3(x)
        x = x + self.cross_attn(h.reshape(b, t * s, d), context, text_kv).reshape(x.shape)
        h = (layer_norm(x, self.eps) * (1 + scale2) + shift2).astype(dtype)
        fc1, gelu, fc2 = self.ffn
        h = fc2(gelu(fc1(h)))
        return (x + h * gate2).astype(dtype)


class Head(nn.Module):
    """Final modulated LayerNorm and projection to patch outputs."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.eps = args.eps
        self.head = nn.Linear(args.dim, args.out_dim * math.prod(args.patch_size))
        self.modulation = mx.random.normal((1, 2, args.dim)) / math.sqrt(args.dim)

    def __call__(self, x: mx.array, e: mx.array) -> mx.array:
        mod = self.modulation.astype(mx.float32) + e[:, :, None, :]  # [B, T, 2, dim]
        shift, scale = mod[:, :, 0:1], mod[:, :, 1:2]
        return self.head((layer_norm(x, self.eps) * (1 + scale) + shift).astype(x.dtype))


class PatchEmbedding(nn.Module):
    """Wan's Conv3d patch embedding, done as a reshape and a matmul (kernel == stride)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.patch_size = args.patch_size
        self.weight = mx.random.normal((args.dim, *args.patch_size, args.in_dim)) * 0.02
        self.bias = mx.zeros((args.dim,))

    def __call__(self, x: mx.array) -> mx.array:
        b, t, h, w, c = x.shape
        pt, ph, pw = self.patch_size
        x = x.reshape(b, t // pt, pt, h // ph, ph, w // pw, pw, c)
        x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, t // pt, h // ph, w // pw, -1)
        weight = self.weight.reshape(self.weight.shape[0], -1).astype(x.dtype)
        return x @ weight.T + self.bias.astype(x.dtype)


class S2DiT(nn.Module):
    """The S2DiT model: predicts the flow velocity v = noise - x0 for latent video chunks."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        args.validate()
        self.args = args
        dim = args.dim
        self.patch_embedding = PatchEmbedding(args)
        self.text_embedding = [nn.Linear(args.text_dim, dim), GeluTanh()]
        self.text_embedding.append(nn.Linear(dim, dim))
        self.time_embedding = [nn.Linear(args.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim)]
        self.time_projection = [nn.SiLU(), nn.Linear(dim, 6 * dim)]
        self.blocks = [Block(args, block_type) for block_type in args.layers]
        self.head = Head(args)

    def make_cache(self) -> StreamCache:
        """Fresh streaming state: each layer's cache, as its attention kind makes it."""
        return StreamCache([attention_kind(b).make_cache(self.args) for b in self.args.layers])

    def embed_text(self, context: mx.array) -> mx.array:
        """Zero-pad (or trim) the text to text_len tokens, then embed, as Wan does."""
        length = context.shape[1]
        if length < self.args.text_len:
            pad = mx.zeros((context.shape[0], self.args.text_len - length, context.shape[2]))
            context = mx.concatenate([context, pad.astype(context.dtype)], axis=1)
        context = context[:, : self.args.text_len]
        fc1, gelu, fc2 = self.text_embedding
        return fc2(gelu(fc1(context)))

    def embed_time(self, t: mx.array, frames: int) -> tuple[mx.array, mx.array]:
        """Per-frame time embedding [B, T, dim] and block modulation [B, T, 6, dim], float32."""
        t = t.astype(mx.float32)
        if t.ndim == 1:
            t = mx.broadcast_to(t[:, None], (t.shape[0], frames))
        e = sinusoidal_embedding(t, self.args.freq_dim)
        dtype = self.time_embedding[0].weight.dtype
        e = e.astype(dtype)
        for layer in self.time_embedding:
            e = layer(e)
        e0 = e
        for layer in self.time_projection:
            e0 = layer(e0)
        e0 = e0.astype(mx.float32).reshape(*e0.shape[:2], 6, self.args.dim)
        return e.astype(mx.float32), e0

    def check_input(self, x: mx.array) -> None:
        """Raise S2DiTError when the latent grid does not fit the patch and SSA strides."""
        _, _, h, w, c = x.shape
        m = self.args.spatial_multiple()
        if h % m or w % m:
            raise S2DiTError(f"latent size {h}x{w} must be a multiple of {m} (patch x SSA stride)")
        if c != self.args.in_dim:
            raise S2DiTError(f"latents have {c} channels, the model expects {self.args.in_dim}")

    def __call__(
        self,
        x: mx.array,
        t: mx.array,
        context: mx.array,
        cache: StreamCache | None = None,
        update_cache: bool = False,
        chunk_frames: int | None = None,
    ) -> mx.array:
        """Flow velocity for latents x [B, T, H, W, C] at timesteps t ([B] or [B, T], 0..1000)."""
        self.check_input(x)
        b, frames, height, width, _ = x.shape
        tokens = self.patch_embedding(x)  # [B, T, h, w, dim]
        grid = tokens.shape[1:4]
        tokens = tokens.reshape(b, grid[0], grid[1] * grid[2], -1)
        e, e0 = self.embed_time(t, grid[0])
        if cache is None:
            context = self.embed_text(context)
        else:  # the prompt is fixed within a stream: its text side is computed once
            context = cache.text.embed(context, self.embed_text)
        offset = cache.frames if cache is not None else 0
        for i, block in enumerate(self.blocks):
            layer_cache = cache.layers[i] if cache is not None else None
            layout = TokenLayout(grid, offset, chunk_frames, layer_cache, update_cache)
            text_kv = None
            if cache is not None:
                text_kv = cache.text.cross(i, lambda b=block: b.cross_attn.keys_values(context))
            tokens = block(tokens, e0, context, layout, text_kv)
        if cache is not None and update_cache:
            cache.frames += grid[0]
        out = self.head(tokens, e)  # [B, T, S, out_dim * prod(patch)]
        return self.unpatchify(out, grid).astype(x.dtype)

    def unpatchify(self, out: mx.array, grid: tuple[int, int, int]) -> mx.array:
        """[B, T, h*w, pt*ph*pw*C] -> [B, T*pt, h*ph, w*pw, C] in Wan's (pt, ph, pw, c) order."""
        b = out.shape[0]
        pt, ph, pw = self.args.patch_size
        f, h, w = grid
        out = out.reshape(b, f, h, w, pt, ph, pw, self.args.out_dim)
        out = out.transpose(0, 1, 4, 2, 5, 3, 6, 7)
        return out.reshape(b, f * pt, h * ph, w * pw, self.args.out_dim)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map Wan-layout PyTorch weights onto ours (conv layouts); our own names pass through."""
        out = {}
        for name, w in weights.items():
            if name == "patch_embedding.weight" and w.ndim == 5 and w.shape[-1] != self.args.in_dim:
                w = w.transpose(0, 2, 3, 4, 1)  # O, I, D, H, W -> O, D, H, W, I
            if name.startswith("model."):
                name = name[len("model.") :]
            out[name] = w
        return out
