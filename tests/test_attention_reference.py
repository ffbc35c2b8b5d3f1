"""Brute-force float64 NumPy references for the S2DiT self-attention blocks.

Each reference is written straight from its definition (docs/architecture.md and the ModelArgs
comments) with explicit loops and token masks, reads the module's own weights after EVERY
parameter has been randomised, and must match the float32 MLX module to a max abs error of
TOL = 1e-4. Softmax and linear attention use per-query visibility sets, never the modules'
chunk slicing or running sums, so the block-causal bookkeeping is checked independently.
"""

# isort: off
import s2dit_mlx  # noqa: F401

# isort: on
import math

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from s2dit_mlx.attention import TokenLayout, attention_kind
from s2dit_mlx.attention.full import FullAttention
from s2dit_mlx.attention.lcha import LinConvAttention
from s2dit_mlx.attention.ssa import StrideSelfAttention
from s2dit_mlx.models import layers
from s2dit_mlx.models.layers import apply_rope, rope_table
from s2dit_mlx.models.s2dit import ModelArgs

TOL = 1e-4  # max abs error, float32 MLX module vs float64 NumPy reference
BREAK = 1e-3  # a deliberately wrong module must miss the reference by at least this much
GRID = (5, 4, 6)  # (frames, height, width) in tokens

# (chunk_frames, window, sink): block-causal settings; 5 frames in chunks of 2 leaves a short
# last chunk, chunks of 1 give 5 chunks so windows and sinks can both bite.
CAUSAL = [
    (2, None, 0),
    (2, None, 1),
    (2, 1, 0),
    (2, 1, 1),
    (2, 2, 0),
    (1, 2, 1),
    (1, 3, 1),
    (1, 1, 0),
]


# ---------------------------------------------------------------- setup helpers


def make_args(dim: int = 24, num_heads: int = 2, **kw) -> ModelArgs:
    """Tiny ModelArgs; only the attention-related fields matter here."""
    args = ModelArgs(dim=dim, num_heads=num_heads, ffn_dim=32, text_dim=8, layers=["full"], **kw)
    args.validate()
    return args


def randomise(module, seed: int):
    """Replace every parameter of `module` by random values of a sensible scale."""
    rng = np.random.default_rng(seed)
    new = []
    for name, p in tree_flatten(module.parameters()):
        if name.startswith("norm_") and name.endswith("weight"):
            val = 1.0 + 0.3 * rng.standard_normal(p.shape)
        elif name.endswith("weight") and p.ndim == 2:  # nn.Linear [out, in]
            val = rng.standard_normal(p.shape) / math.sqrt(p.shape[1])
        else:  # biases, gate, conv weight, SSA down/up
            val = 0.5 * rng.standard_normal(p.shape)
        new.append((name, mx.array(val.astype(np.float32))))
    module.update(tree_unflatten(new))
    mx.eval(module.parameters())
    return module


class Weights(dict):
    """The module's parameters in float64; remembers which ones the reference read."""

    def __init__(self, module):
        super().__init__(
            (k, np.array(v).astype(np.float64)) for k, v in tree_flatten(module.parameters())
        )
        self.used: set[str] = set()

    def __getitem__(self, key):
        self.used.add(key)
        return super().__getitem__(key)

    def assert_all_used(self):
        assert self.used == set(self.keys()), f"reference ignored {set(self.keys()) - self.used}"


def run(module, x: np.ndarray, grid, frame_offset=0, chunk_frames=None) -> np.ndarray:
    """Call an attention module on float32 tokens [B, N, dim]."""
    out = module(mx.array(x.astype(np.float32)), TokenLayout(grid, frame_offset, chunk_frames))
    return np.array(out.astype(mx.float32)).astype(np.float64)


def tokens(grid, dim, batch=2, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, math.prod(grid), dim))


def max_err(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a - b).max())


# ---------------------------------------------------------------- reference math (float64)


def linear(w: Weights, name: str, x: np.ndarray) -> np.ndarray:
    return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def positions(grid, frame_offset: int) -> np.ndarray:
    """(t, y, x) of every token in row-major (t, h, w) order; t starts at frame_offset."""
    frames, height, width = grid
    return np.array(
        [
            (frame_offset + t, y, x)
            for t in range(frames)
            for y in range(height)
            for x in range(width)
        ],
        dtype=np.float64,
    )


def rope(x: np.ndarray, pos: np.ndarray, theta: float = 10000.0) -> np.ndarray:
    """Wan's 3D RoPE on x [N, d]: pair (x[2i], x[2i+1]) times exp(i * pos_axis * freq).

    The d/2 pairs are split over (t, h, w) as axis dims [d - 4(d//6), 2(d//6), 2(d//6)];
    pair j of an axis of size a has frequency theta^(-2j / a).
    """
    d = x.shape[-1]
    sixth = d // 6
    out = np.empty_like(x)
    pair = 0
    for axis, axis_dim in enumerate((d - 4 * sixth, 2 * sixth, 2 * sixth)):
        for j in range(axis_dim // 2):
            angle = pos[:, axis] * theta ** (-2.0 * j / axis_dim)
            re, im = x[:, 2 * pair], x[:, 2 * pair + 1]
            out[:, 2 * pair] = re * np.cos(angle) - im * np.sin(angle)
            out[:, 2 * pair + 1] = re * np.sin(angle) + im * np.cos(angle)
            pair += 1
    assert pair == d // 2
    return out


def token_mask(grid, chunk_frames, window=None, sink=0) -> np.ndarray:
    """mask[i, j]: may query token i see key token j? Chunk rule, token by token."""
    frames, height, width = grid
    n = frames * height * width
    frame = [i // (height * width) for i in range(n)]
    mask = np.zeros((n, n), dtype=bool)
    for i in range(n):
        for j in range(n):
            if chunk_frames is None:
                mask[i, j] = True
                continue
            c, cj = frame[i] // chunk_frames, frame[j] // chunk_frames
            mask[i, j] = cj <= c and (cj < sink or window is None or cj > c - window)
    return mask


def softmax_attention(q, k, v, mask, scale) -> np.ndarray:
    """Per query: softmax over its visible keys only."""
    out = np.zeros((q.shape[0], v.shape[1]))
    for i in range(q.shape[0]):
        vis = np.flatnonzero(mask[i])
        scores = (k[vis] @ q[i]) * scale
        p = np.exp(scores - scores.max())
        out[i] = (p / p.sum()) @ v[vis]
    return out


def projected_qkv(w: Weights, x: np.ndarray, eps: float):
    """q, k (RMSNorm over the whole dim, with weight) and v of one sample [N, dim]."""
    q = rms_norm(linear(w, "q", x), w["norm_q.weight"], eps)
    k = rms_norm(linear(w, "k", x), w["norm_k.weight"], eps)
    return q, k, linear(w, "v", x)


def multi_head_softmax(q, k, v, pos, mask, args: ModelArgs) -> np.ndarray:
    hd = args.head_dim
    out = np.zeros_like(v)
    for h in range(args.num_heads):
        sl = slice(h * hd, (h + 1) * hd)
        qh, kh = rope(q[:, sl], pos, args.rope_theta), rope(k[:, sl], pos, args.rope_theta)
        out[:, sl] = softmax_attention(qh, kh, v[:, sl], mask, 1.0 / math.sqrt(hd))
    return out


def full_reference(w, x, args, grid, frame_offset=0, chunk_frames=None):
    """FullAttention: o(softmax(rope(norm q) rope(norm k)^T / sqrt(d) + mask) v)."""
    pos = positions(grid, frame_offset)
    mask = token_mask(grid, chunk_frames, args.window, args.sink)
    out = []
    for xb in x:
        q, k, v = projected_qkv(w, xb, args.eps)
        out.append(linear(w, "o", multi_head_softmax(q, k, v, pos, mask, args)))
    return np.stack(out)


def causal_depthwise_conv(v, weight, bias, extra_pad_first: bool = False) -> np.ndarray:
    """v [T, h, w, C]; weight [C, kt, kh, kw, 1]. Zero-padded kt-1 frames before the start,
    'same' zero padding in h and w; tap kt-1 in time is the current frame.

    For an even spatial kernel 'same' needs one more zero on one side: after (PyTorch's
    padding='same', the default here) or before (extra_pad_first)."""
    frames, height, width, _ = v.shape
    _, kt, kh, kw, _ = weight.shape
    first_h, first_w = (kh // 2, kw // 2) if extra_pad_first else ((kh - 1) // 2, (kw - 1) // 2)
    out = np.zeros_like(v) + bias
    for t in range(frames):
        for y in range(height):
            for x in range(width):
                for a in range(kt):
                    ts = t - (kt - 1) + a
                    if ts < 0:
                        continue
                    for b in range(kh):
                        ys = y + b - first_h
                        if not 0 <= ys < height:
                            continue
                        for c in range(kw):
                            xs = x + c - first_w
                            if 0 <= xs < width:
                                out[t, y, x] += weight[:, a, b, c, 0] * v[ts, ys, xs]
    return out


def lcha_reference(w, x, args, grid, frame_offset=0, chunk_frames=None, extra_pad_first=False):
    """LinConvAttention: o(a * linear + (1 - a) * conv_proj(conv(v))), a = sigmoid(gate)."""
    pos = positions(grid, frame_offset)
    # Linear attention has no window: a chunk sees itself and every earlier chunk.
    mask = token_mask(grid, chunk_frames)
    hd = args.head_dim
    a = 1.0 / (1.0 + np.exp(-w["gate"]))
    out = []
    for xb in x:
        q, k, v = projected_qkv(w, xb, args.eps)
        lin = np.zeros_like(v)
        for h in range(args.num_heads):
            sl = slice(h * hd, (h + 1) * hd)
            fq = softplus(linear(w, "feature_map", q[:, sl]))  # [N, F]
            fk = softplus(linear(w, "feature_map", k[:, sl]))
            rq, rk = (
                (rope(f, pos, args.rope_theta) for f in (fq, fk)) if args.lcha_rope else (fq, fk)
            )
            for i in range(len(xb)):
                vis = np.flatnonzero(mask[i])
                s = sum(np.outer(rk[j], v[j, sl]) for j in vis)  # S = sum phi(k_j) v_j^T
                z = fk[vis].sum(axis=0)  # z = sum phi(k_j), no RoPE
                lin[i, sl] = (rq[i] @ s) / (fq[i] @ z + args.lcha_eps)
        conv = causal_depthwise_conv(
            v.reshape(*grid, -1), w["conv_weight"], w["conv_bias"], extra_pad_first
        ).reshape(v.shape)
        conv = linear(w, "conv_proj", conv)
        out.append(linear(w, "o", a * lin + (1 - a) * conv))
    return np.stack(out)


def ssa_reference(w, x, args, grid, frame_offset=0, chunk_frames=None):
    """StrideSelfAttention: pool q, k, v per s x s patch, low-res attention, spread back, o."""
    s = args.ssa_stride
    frames, height, width = grid
    low = (frames, height // s, width // s)
    pos = positions(low, frame_offset)
    mask = token_mask(low, chunk_frames, args.window, args.sink)
    out = []
    for xb in x:
        full_res = [a.reshape(*grid, -1) for a in projected_qkv(w, xb, args.eps)]
        pooled = []
        for a, name in zip(full_res, ("down_q", "down_k", "down_v"), strict=True):
            p = np.zeros((*low, args.dim))
            for t in range(frames):
                for yy in range(low[1]):
                    for xx in range(low[2]):
                        for dy in range(s):
                            for dx in range(s):
                                pix = a[t, yy * s + dy, xx * s + dx]
                                p[t, yy, xx] += w[name][dy * s + dx] * pix
            pooled.append(p.reshape(-1, args.dim))
        y_low = multi_head_softmax(*pooled, pos, mask, args).reshape(*low, -1)
        y = np.zeros((*grid, args.dim))
        for t in range(frames):
            for yy in range(height):
                for xx in range(width):
                    patch_pos = (yy % s) * s + (xx % s)
                    y[t, yy, xx] = w["up"][patch_pos] * y_low[t, yy // s, xx // s]
        out.append(linear(w, "o", y.reshape(-1, args.dim)))
    return np.stack(out)


REFERENCES = {
    FullAttention: full_reference,
    LinConvAttention: lcha_reference,
    StrideSelfAttention: ssa_reference,
}


def check(cls, args, grid, chunk_frames=None, frame_offset=0, seed=0, batch=2):
    """Module vs reference: asserts max abs error <= TOL; returns (error, ref, module, x)."""
    module = randomise(cls(args), seed)
    w = Weights(module)
    x = tokens(grid, args.dim, batch=batch, seed=seed + 100)
    ref = REFERENCES[cls](w, x, args, grid, frame_offset, chunk_frames)
    w.assert_all_used()
    err = max_err(run(module, x, grid, frame_offset, chunk_frames), ref)
    assert err <= TOL, f"{cls.__name__}: max abs error {err:.2e} > {TOL}"
    return err, ref, module, x


# ---------------------------------------------------------------- RoPE


@pytest.mark.parametrize("head_dim", [8, 12, 14, 16, 22])
@pytest.mark.parametrize("frame_offset", [0, 3])
def test_rope_matches_definition(head_dim, frame_offset):
    grid = (4, 3, 5)
    x = np.random.default_rng(head_dim).standard_normal((1, math.prod(grid), 2, head_dim))
    cos, sin = rope_table(head_dim, grid, frame_offset)
    got = np.array(apply_rope(mx.array(x.astype(np.float32)), cos, sin)).astype(np.float64)
    pos = positions(grid, frame_offset)
    ref = np.stack([rope(x[0, :, h], pos) for h in range(2)], axis=1)[None]
    assert max_err(got, ref) <= TOL
    # Sanity: one frame more of offset gives a different rotation.
    shifted = np.stack([rope(x[0, :, h], positions(grid, frame_offset + 1)) for h in range(2)], 1)
    assert max_err(got, shifted[None]) > BREAK


# ---------------------------------------------------------------- FullAttention


@pytest.mark.parametrize("dim,heads", [(24, 2), (28, 2), (36, 3)])
def test_full_bidirectional(dim, heads):
    check(FullAttention, make_args(dim, heads), GRID)


@pytest.mark.parametrize("chunk_frames,window,sink", CAUSAL)
def test_full_block_causal(chunk_frames, window, sink):
    args = make_args(28, 2, window=window, sink=sink)
    _, ref, module, x = check(FullAttention, args, GRID, chunk_frames)
    # Sanity: the mask (and the window, when set) matters, so a module ignoring it would fail.
    bidirectional = full_reference(Weights(module), x, args, GRID)
    assert max_err(ref, bidirectional) > BREAK
    if window is not None:
        unbounded = make_args(28, 2, window=None, sink=sink)
        assert (
            max_err(ref, full_reference(Weights(module), x, unbounded, GRID, 0, chunk_frames))
            > BREAK
        )


def test_full_tiled_attention(monkeypatch):
    """The query-tiled CPU attention path (tiny score budget) matches too."""
    monkeypatch.setattr(layers, "ATTENTION_SCORE_BUDGET", 200)
    check(FullAttention, make_args(28, 2), GRID)
    check(StrideSelfAttention, make_args(), GRID, chunk_frames=2)


# ---------------------------------------------------------------- LinConvAttention


@pytest.mark.parametrize("lcha_rope,feature_dim", [(True, None), (False, None), (False, 8)])
@pytest.mark.parametrize("kernel", [(3, 3, 3), (2, 1, 3)])
@pytest.mark.parametrize("chunk_frames", [None, 2, 1])
def test_lcha(lcha_rope, feature_dim, kernel, chunk_frames):
    args = make_args(lcha_rope=lcha_rope, lcha_feature_dim=feature_dim, lcha_conv_kernel=kernel)
    _, ref, module, x = check(LinConvAttention, args, GRID, chunk_frames, batch=1)
    if chunk_frames is not None:
        assert max_err(ref, lcha_reference(Weights(module), x, args, GRID)) > BREAK


# ---------------------------------------------------------------- StrideSelfAttention


@pytest.mark.parametrize("stride,grid", [(2, GRID), (3, (3, 6, 3)), (1, (3, 2, 3))])
@pytest.mark.parametrize("chunk_frames,window,sink", [(None, None, 0), (2, None, 0), (1, 2, 1)])
def test_ssa(stride, grid, chunk_frames, window, sink):
    args = make_args(ssa_stride=stride, window=window, sink=sink)
    check(StrideSelfAttention, args, grid, chunk_frames)


# ---------------------------------------------------------------- frame offset (streaming)


def stream(module, x, grid, chunk_frames, cache, offsets):
    """Feed x chunk by chunk through a layer cache, each chunk at its own frame offset."""
    frames, height, width = grid
    per = height * width
    outs = []
    for c, start in enumerate(range(0, frames, chunk_frames)):
        f = min(chunk_frames, frames - start)
        xc = mx.array(x[:, start * per : (start + f) * per].astype(np.float32))
        layout = TokenLayout((f, height, width), offsets[c], None, cache, True)
        outs.append(np.array(module(xc, layout)).astype(np.float64))
    return np.concatenate(outs, axis=1)


@pytest.mark.parametrize("cls", [FullAttention, LinConvAttention, StrideSelfAttention])
@pytest.mark.parametrize("chunk_frames,window,sink", [(2, None, 0), (1, 2, 1), (1, 2, 0)])
def test_frame_offset_streaming(cls, chunk_frames, window, sink):
    """Chunks fed one by one at frame_offset = chunk start must equal the block-causal
    reference over the whole video: keys cached at earlier offsets meet later queries."""
    args = make_args(window=window, sink=sink)
    module = randomise(cls(args), seed=5)
    w = Weights(module)
    x = tokens(GRID, args.dim, batch=1, seed=6)
    ref = REFERENCES[cls](w, x, args, GRID, 0, chunk_frames)
    w.assert_all_used()

    kind = {FullAttention: "full", LinConvAttention: "lcha", StrideSelfAttention: "ssa"}[cls]

    def cache():
        return attention_kind(kind).make_cache(args)

    starts = list(range(0, GRID[0], chunk_frames))
    err = max_err(stream(module, x, GRID, chunk_frames, cache(), starts), ref)
    assert err <= TOL, f"max abs error {err:.2e} > {TOL}"
    # Sanity: ignoring the offset (every chunk at t=0) must break the match.
    wrong = stream(module, x, GRID, chunk_frames, cache(), [0] * len(starts))
    assert max_err(wrong, ref) > BREAK


def test_frame_offset_shifts_positions():
    """A single call at frame_offset > 0 is the reference at positions t + offset."""
    for cls in REFERENCES:
        check(cls, make_args(), GRID, chunk_frames=2, frame_offset=3, batch=1)


# ---------------------------------------------------------------- the tests can fail


@pytest.mark.parametrize("cls", [FullAttention, LinConvAttention, StrideSelfAttention])
def test_every_parameter_is_checked(cls):
    """Perturbing any one parameter of the module (not the reference) breaks the match."""
    args = make_args(lcha_conv_kernel=(2, 3, 3))
    _, ref, module, x = check(cls, args, GRID, chunk_frames=2, batch=1)
    rng = np.random.default_rng(9)
    for name, p in tree_flatten(module.parameters()):
        bumped = p + mx.array(0.5 * rng.standard_normal(p.shape).astype(np.float32))
        module.update(tree_unflatten([(name, bumped)]))
        err = max_err(run(module, x, GRID, 0, 2), ref)
        module.update(tree_unflatten([(name, p)]))
        assert err > BREAK, f"perturbing {name} went unnoticed (error {err:.2e})"


def _even_kernel_error(kernel, extra_pad_first: bool) -> float:
    args = make_args(lcha_conv_kernel=kernel)
    module = randomise(LinConvAttention(args), seed=3)
    w = Weights(module)
    x = tokens(GRID, args.dim, batch=1, seed=4)
    ref = lcha_reference(w, x, args, GRID, 0, 2, extra_pad_first)
    return max_err(run(module, x, GRID, 0, 2), ref)


@pytest.mark.parametrize("kernel", [(3, 2, 2), (1, 4, 3)])
def test_lcha_even_spatial_kernel_pytorch_same(kernel):
    """Even kh/kw as PyTorch's Conv3d(padding='same') pads (extra zero after: bottom/right)."""
    assert _even_kernel_error(kernel, extra_pad_first=False) <= TOL
