"""MIL emitters for S2DiT: the same computation as models/s2dit.py, written with coremltools' builder.

One emitter per module, fed from the model's own weights (a flat `name -> float32 array` dict, the
names of `tree_flatten(model.parameters())`): no PyTorch twin. Tensors are row-major like MLX:
tokens [1, N, dim], heads [1, H, N, D]; a chunk of `frames` latent frames is one call. Each
attention kind brings its own emitter and states (s2dit_mlx/attention/); this module holds the
shared pieces (projections, RoPE, the windowed softmax) and the rest of the block.

Streaming state lives in fp16 Core ML states (iOS 18):
- softmax kinds (`full`, `ssa`): key and value ring buffers [1, H, slots * n, D] (n tokens per
  chunk), slots and slot arithmetic from cache.ChunkSchedule (sink + window - 1 slots; slot s
  holds a visible chunk exactly when s < chunk index, so the mask is one comparison against the
  `chunk` input);
- `lcha`: running *means* of phi(k) v^T and phi(k) over every token written so far (not sums:
  sums grow with video length and overflow fp16), [1, H, F, D] and [1, H, F, 1]; the linear
  attention ratio is unchanged once eps is divided by the token count. Plus the last kt - 1 input
  frames of the causal depthwise conv, channels-first [1, C, kt - 1, h, w].
Functions: `denoise` reads the states; `write` (the clean pass at t=0) reads them and writes each
state exactly once, each update placed right after the op that produces it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..attention import attention_kind
from ..cache import ChunkSchedule
from ..errors import S2DiTError
from ..models.layers import rope_axis_dims
from ._ct import require
from .shapes import StateSpec, StreamShapes

ct = require()
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import Function, Program, types  # noqa: E402

MASK_NEG = -30000.0  # additive mask: exp(-3e4) is 0 in fp16 and fp32, and -3e4 fits in fp16
DTYPES = {"fp32": (np.float32, types.fp32), "fp16": (np.float16, types.fp16)}


def dit_state_specs(args, shapes: StreamShapes) -> list[StateSpec]:
    """The fp16 states of a streaming S2DiT export, in function-input order."""
    call = shapes.call_shape(args.patch_size)
    specs = []
    for i, kind in enumerate(args.layers):
        specs += attention_kind(kind).coreml_states(args, call, i)
    return specs


@dataclass
class Ctx:
    """What one function's emission shares: dtype, weights, inputs, per-grid RoPE tables."""

    dtype: str
    weights: dict[str, np.ndarray]
    write: bool
    chunk: object = None  # int32 [1] var: index of the chunk being computed
    states: dict = field(default_factory=dict)  # state name -> state var
    rope: dict = field(default_factory=dict)  # grid -> (cos, sin) vars [N, D]
    chunk_scalars: dict = field(default_factory=dict)

    @property
    def np_dtype(self):
        return DTYPES[self.dtype][0]

    def w(self, name: str, value: np.ndarray | None = None):
        """A named weight const in the compute dtype."""
        arr = self.weights[name] if value is None else value
        return mb.const(val=np.asarray(arr, np.float32).astype(self.np_dtype), name=name)

    def c(self, value) -> np.ndarray:
        """An anonymous constant in the compute dtype."""
        return np.asarray(value, np.float32).astype(self.np_dtype)

    def to_compute(self, x):
        return x if self.dtype == "fp16" else mb.cast(x=x, dtype=self.dtype)

    def to_state(self, x):
        return x if self.dtype == "fp16" else mb.cast(x=x, dtype="fp16")


# ------------------------------------------------------------------------------------------------
# Small modules


def linear(ctx: Ctx, x, prefix: str):
    """nn.Linear on x of rank <= 3, weights `prefix.weight` [out, in] and `prefix.bias`."""
    bias = ctx.weights.get(prefix + ".bias")
    kwargs = {"bias": ctx.w(prefix + ".bias")} if bias is not None else {}
    return mb.linear(x=x, weight=ctx.w(prefix + ".weight"), **kwargs)


def rms_norm(ctx: Ctx, x, prefix: str, eps: float):
    """nn.RMSNorm over the last axis: x / sqrt(mean(x^2) + eps) * weight."""
    mean_sq = mb.reduce_mean(x=mb.mul(x=x, y=x), axes=[-1], keep_dims=True)
    return mb.mul(
        x=mb.mul(x=x, y=mb.rsqrt(x=mean_sq, epsilon=ctx.np_dtype(eps))), y=ctx.w(prefix + ".weight")
    )


def layer_norm(ctx: Ctx, x, eps: float, prefix: str | None = None):
    """LayerNorm over the last axis, affine when `prefix` names weight and bias."""
    kwargs = {}
    if prefix is not None:
        kwargs = {"gamma": ctx.w(prefix + ".weight"), "beta": ctx.w(prefix + ".bias")}
    return mb.layer_norm(x=x, axes=[-1], epsilon=ctx.np_dtype(eps), **kwargs)


def modulate(ctx: Ctx, x, eps: float, shift, scale):
    """LN(x) * (1 + scale) + shift."""
    h = layer_norm(ctx, x, eps)
    return mb.add(x=mb.mul(x=h, y=mb.add(x=scale, y=ctx.c(1.0))), y=shift)


def split_heads(x, heads: int):
    """[1, N, H*D] -> [1, H, N, D]."""
    n, dim = x.shape[1], x.shape[2]
    return mb.transpose(x=mb.reshape(x=x, shape=[1, n, heads, dim // heads]), perm=[0, 2, 1, 3])


def merge_heads(x):
    """[1, H, N, D] -> [1, N, H*D]."""
    _, heads, n, hd = x.shape
    return mb.reshape(x=mb.transpose(x=x, perm=[0, 2, 1, 3]), shape=[1, n, heads * hd])


def chunk_scalars(ctx: Ctx) -> dict:
    """fp32 scalars of the chunk index c: c, c/(c+1), 1/(c+1) (shared by every layer)."""
    if not ctx.chunk_scalars:
        c = mb.cast(x=ctx.chunk, dtype="fp32")
        inv = mb.real_div(x=np.float32(1.0), y=mb.add(x=c, y=np.float32(1.0)))
        ctx.chunk_scalars = {"c": c, "inv": inv, "past": mb.mul(x=c, y=inv)}
    return ctx.chunk_scalars


# ------------------------------------------------------------------------------------------------
# RoPE


def rope_tables(ctx: Ctx, args, grid: tuple[int, int, int]):
    """cos and sin [N, D], each pair's angle repeated, for a chunk at frame offset chunk * frames."""
    if grid in ctx.rope:
        return ctx.rope[grid]
    frames, height, width = grid
    dt, dh, dw = rope_axis_dims(args.head_dim)
    theta = args.rope_theta

    def freqs(axis_dim):
        return 1.0 / theta ** (np.arange(0, axis_dim, 2, dtype=np.float64) / axis_dim)

    t_pos, h_pos, w_pos = (
        p.reshape(-1, 1).astype(np.float64)
        for p in np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
    )
    # Height and width angles do not depend on the chunk: constants computed in float64 like MLX.
    hw = np.concatenate([h_pos * freqs(dh)[None], w_pos * freqs(dw)[None]], axis=1)
    offset = mb.mul(x=chunk_scalars(ctx)["c"], y=np.float32(frames))  # [1] fp32
    pos_t = mb.add(x=mb.reshape(x=offset, shape=[1, 1]), y=t_pos.astype(np.float32))
    angle_t = mb.mul(x=pos_t, y=freqs(dt).astype(np.float32)[None])  # [N, dt/2] fp32
    tables = []
    for fn, np_fn in ((mb.cos, np.cos), (mb.sin, np.sin)):
        half = mb.concat(values=[fn(x=angle_t), np_fn(hw).astype(np.float32)], axis=1)
        half = mb.expand_dims(x=half, axes=[-1])  # [N, D/2, 1]
        full = mb.reshape(x=mb.concat(values=[half, half], axis=-1), shape=[half.shape[0], -1])
        tables.append(mb.cast(x=full, dtype="fp16") if ctx.dtype == "fp16" else full)
    ctx.rope[grid] = tuple(tables)
    return ctx.rope[grid]


def rotate_pairs_matrix(dim: int) -> np.ndarray:
    """P with (x @ P) = (-x1, x0) on each interleaved pair (x0, x1)."""
    p = np.zeros((dim, dim), np.float32)
    for i in range(0, dim, 2):
        p[i + 1, i] = -1.0
        p[i, i + 1] = 1.0
    return p


def apply_rope(ctx: Ctx, x, tables):
    """Wan's complex multiply on interleaved pairs of x [1, H, N, D]: x cos + rot(x) sin."""
    cos, sin = tables
    rotated = mb.matmul(x=x, y=ctx.c(rotate_pairs_matrix(x.shape[-1])))
    return mb.add(x=mb.mul(x=x, y=cos), y=mb.mul(x=rotated, y=sin))


# ------------------------------------------------------------------------------------------------
# Attention


def softmax_with_window(
    ctx: Ctx, args, layer: int, q, k, v, shapes: StreamShapes, schedule: ChunkSchedule | None = None
):
    """Block-causal softmax attention of the chunk's q [1,H,n,D] over the ring buffer and itself.

    `schedule` (default: the export's window and sink) says which slots the layer keeps.
    """
    n = q.shape[2]
    schedule = schedule or shapes.schedule
    slots = schedule.past_slots
    keys_state, values_state = ctx.states[f"l{layer}_keys"], ctx.states[f"l{layer}_values"]
    past_k, past_v = mb.read_state(input=keys_state), mb.read_state(input=values_state)
    if ctx.write:
        slot = schedule.mil_slot(mb, ctx.chunk)
        start = mb.mul(x=slot, y=np.int32(n))
        zero = np.zeros(1, np.int32)
        begin = mb.concat(values=[zero, zero, start, zero], axis=0)
        end = mb.add(x=begin, y=np.array([1, args.num_heads, n, args.head_dim], np.int32))
        for state, past, new in ((keys_state, past_k, k), (values_state, past_v, v)):
            updated = mb.slice_update(x=past, update=ctx.to_state(new), begin=begin, end=end)
            mb.coreml_update_state(state=state, value=updated)
    # Slot s holds a visible chunk iff s < chunk (cache.ChunkSchedule).
    valid = mb.cast(x=mb.less(x=np.arange(slots, dtype=np.int32), y=ctx.chunk), dtype=ctx.dtype)
    bias = mb.mul(x=mb.sub(x=valid, y=ctx.c(1.0)), y=ctx.c(-MASK_NEG))  # 0 or MASK_NEG
    bias = mb.tile(x=mb.reshape(x=bias, shape=[slots, 1]), reps=[1, n])
    mask = mb.concat(
        values=[mb.reshape(x=bias, shape=[1, 1, 1, slots * n]), ctx.c(np.zeros((1, 1, 1, n)))],
        axis=-1,
    )
    keys = mb.concat(values=[ctx.to_compute(past_k), k], axis=2)
    values = mb.concat(values=[ctx.to_compute(past_v), v], axis=2)
    # SDPA scales by 1/sqrt(q.shape[-1]) = 1/sqrt(head_dim), the model's own scale.
    return mb.scaled_dot_product_attention(query=q, key=keys, value=values, attn_mask=mask)


def qkv(ctx: Ctx, args, x, prefix: str):
    """Projected, RMS-normed q, k and v [1, N, dim]."""
    q = rms_norm(ctx, linear(ctx, x, prefix + ".q"), prefix + ".norm_q", args.eps)
    k = rms_norm(ctx, linear(ctx, x, prefix + ".k"), prefix + ".norm_k", args.eps)
    return q, k, linear(ctx, x, prefix + ".v")


def softplus_features(ctx: Ctx, a, prefix: str, heads: int):
    """phi = softplus(W a + b) per head: [1, N, H*D] -> [1, H, N, F]."""
    n, dim = a.shape[1], a.shape[2]
    a = linear(ctx, mb.reshape(x=a, shape=[1, n * heads, dim // heads]), prefix + ".feature_map")
    a = mb.softplus(x=mb.reshape(x=a, shape=[1, n, heads, -1]))
    return mb.transpose(x=a, perm=[0, 2, 1, 3])


def cross_attention(ctx: Ctx, args, layer: int, x, text):
    """Wan text cross-attention: queries from the video tokens, keys and values from the text."""
    prefix = f"blocks.{layer}.cross_attn"
    q = split_heads(
        rms_norm(ctx, linear(ctx, x, prefix + ".q"), prefix + ".norm_q", args.eps), args.num_heads
    )
    k = split_heads(
        rms_norm(ctx, linear(ctx, text, prefix + ".k"), prefix + ".norm_k", args.eps),
        args.num_heads,
    )
    v = split_heads(linear(ctx, text, prefix + ".v"), args.num_heads)
    out = mb.scaled_dot_product_attention(query=q, key=k, value=v)
    return linear(ctx, merge_heads(out), prefix + ".o")


def coreml_emitter(kind: str):
    """The MIL emitter of an attention kind; S2DiTError when the kind has none."""
    emitter = attention_kind(kind).emit_coreml
    if emitter is None:
        raise S2DiTError(f"Core ML export does not support block type '{kind}'")
    return emitter


# ------------------------------------------------------------------------------------------------
# Embeddings, block, head


def patch_embedding(ctx: Ctx, args, latents):
    """[1, f, H, W, C] -> tokens [1, f*h*w, dim]: the kernel == stride Conv3d as a matmul."""
    _, frames, height, width, channels = latents.shape
    _, ph, pw = args.patch_size
    h, w = height // ph, width // pw
    x = mb.reshape(x=latents, shape=[frames * h, ph, w, pw * channels])
    x = mb.transpose(x=x, perm=[0, 2, 1, 3])  # [f*h, w, ph, pw*C]: (ph, pw, c) order
    x = mb.reshape(x=x, shape=[1, frames * h * w, ph * pw * channels])
    weight = ctx.weights["patch_embedding.weight"].reshape(args.dim, -1)
    return mb.linear(
        x=x, weight=ctx.w("patch_embedding.weight", weight), bias=ctx.w("patch_embedding.bias")
    )


def unpatchify(args, out, grid):
    """[1, N, ph*pw*C] -> [1, f, H, W, C] in Wan's (pt, ph, pw, c) order (pt == 1)."""
    frames, h, w = grid
    _, ph, pw = args.patch_size
    c = args.out_dim
    x = mb.reshape(x=out, shape=[frames * h, w, ph, pw * c])
    x = mb.transpose(x=x, perm=[0, 2, 1, 3])
    return mb.reshape(x=x, shape=[1, frames, h * ph, w * pw, c])


def time_embedding(ctx: Ctx, args, t):
    """t [1] (fp32, 0..1000) -> (e [1, 1, dim], e0 [1, 6, dim]); the sinusoid stays fp32."""
    half = args.freq_dim // 2
    freqs = np.power(np.float32(10000.0), -np.arange(half, dtype=np.float32) / np.float32(half))
    angles = mb.mul(x=mb.reshape(x=t, shape=[1, 1]), y=freqs[None].astype(np.float32))
    emb = mb.concat(values=[mb.cos(x=angles), mb.sin(x=angles)], axis=-1)
    if ctx.dtype == "fp16":
        emb = mb.cast(x=emb, dtype="fp16")
    e = linear(ctx, emb, "time_embedding.0")
    e = linear(ctx, mb.silu(x=e), "time_embedding.2")
    e0 = linear(ctx, mb.silu(x=e), "time_projection.1")
    return mb.reshape(x=e, shape=[1, 1, args.dim]), mb.reshape(x=e0, shape=[1, 6, args.dim])


def text_embedding(ctx: Ctx, context):
    """Text encoder output [1, L, text_dim] (already padded to text_len) -> [1, L, dim]."""
    x = linear(ctx, context, "text_embedding.0")
    x = mb.gelu(x=x, mode="TANH_APPROXIMATION")
    return linear(ctx, x, "text_embedding.2")


def block(ctx: Ctx, args, layer: int, x, e0, text, grid, shapes: StreamShapes):
    """A Wan block with AdaLN modulation around a swappable self-attention."""
    prefix = f"blocks.{layer}"
    emitter = coreml_emitter(args.layers[layer])
    mod = mb.add(x=e0, y=ctx.w(prefix + ".modulation"))  # [1, 6, dim]
    shift1, scale1, gate1, shift2, scale2, gate2 = (
        mb.slice_by_index(x=mod, begin=[0, i, 0], end=[1, i + 1, args.dim]) for i in range(6)
    )
    h = modulate(ctx, x, args.eps, shift1, scale1)
    y = emitter(ctx, args, layer, h, grid, shapes)
    x = mb.add(x=x, y=mb.mul(x=y, y=gate1))
    h = layer_norm(ctx, x, args.eps, prefix + ".norm3") if args.cross_attn_norm else x
    x = mb.add(x=x, y=cross_attention(ctx, args, layer, h, text))
    h = modulate(ctx, x, args.eps, shift2, scale2)
    h = mb.gelu(x=linear(ctx, h, prefix + ".ffn.0"), mode="TANH_APPROXIMATION")
    h = linear(ctx, h, prefix + ".ffn.2")
    return mb.add(x=x, y=mb.mul(x=h, y=gate2))


def head(ctx: Ctx, args, x, e):
    """Final modulated LayerNorm and projection to patch outputs."""
    mod = mb.add(x=e, y=ctx.w("head.modulation"))  # [1, 2, dim]
    shift = mb.slice_by_index(x=mod, begin=[0, 0, 0], end=[1, 1, args.dim])
    scale = mb.slice_by_index(x=mod, begin=[0, 1, 0], end=[1, 2, args.dim])
    return linear(ctx, modulate(ctx, x, args.eps, shift, scale), "head.head")


# ------------------------------------------------------------------------------------------------
# Whole functions


def dit_input_specs(args, shapes: StreamShapes, dtype: str) -> dict:
    """Function inputs (name -> placeholder), tensors first, then the states."""
    tdt = DTYPES[dtype][1]
    latent = (1, shapes.frames, shapes.latent_height, shapes.latent_width, args.in_dim)
    inputs = {
        "latents": mb.placeholder(shape=latent, dtype=tdt),
        "t": mb.placeholder(shape=(1,), dtype=types.fp32),
        "context": mb.placeholder(shape=(1, shapes.text_len, args.text_dim), dtype=tdt),
        "chunk": mb.placeholder(shape=(1,), dtype=types.int32),
    }
    for spec in dit_state_specs(args, shapes):
        inputs[spec.name] = mb.state_tensor_placeholder(shape=spec.shape, dtype=types.fp16)
    return inputs


def dit_function(args, weights: dict, shapes: StreamShapes, dtype: str, write: bool) -> Program:
    """One streaming S2DiT call as a MIL program: `denoise` (write=False) or `write` (True).

    Outputs: velocity (flow v = noise - x0) and x0 = latents - t/1000 * v, both [1, f, H, W, C].
    """
    ctx = Ctx(dtype=dtype, weights=weights, write=write)
    inputs = dit_input_specs(args, shapes, dtype)
    with Function(inputs, opset_version=ct.target.iOS18) as func:
        latents, t, context = func.inputs["latents"], func.inputs["t"], func.inputs["context"]
        ctx.chunk = func.inputs["chunk"]
        ctx.states = {s.name: func.inputs[s.name] for s in dit_state_specs(args, shapes)}
        grid = shapes.grid(args.patch_size)
        x = patch_embedding(ctx, args, latents)
        e, e0 = time_embedding(ctx, args, t)
        text = text_embedding(ctx, context)
        for layer in range(len(args.layers)):
            x = block(ctx, args, layer, x, e0, text, grid, shapes)
        v = unpatchify(args, head(ctx, args, x, e), grid)
        sigma = mb.mul(x=t, y=np.float32(1.0 / 1000.0))
        if dtype == "fp16":
            sigma = mb.cast(x=sigma, dtype="fp16")
        velocity = mb.identity(x=v, name="velocity")
        x0 = mb.sub(x=latents, y=mb.mul(x=v, y=sigma), name="x0")
        func.set_outputs([velocity, x0])
    prog = Program()
    prog.add_function("main", func)
    return prog
