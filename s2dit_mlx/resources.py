"""Peak memory (and time) of a generation or a Core ML export, estimated before it starts.

`s2dit generate` and `s2dit export coreml` refuse a request whose estimate exceeds the memory
this machine has available (`--allow-large` runs it anyway): MLX's CPU allocator does not
check for a failed allocation, so an absurd size ends in a segmentation fault, and a merely
huge one in swapping or the kernel's OOM killer.

The model of memory (what a run adds to the process; all counts come from the code paths
they name, and benchmarks/resources.py compares them with measured peaks):

generate
- weights: every parameter of the DiT, VAE and text encoder at the dtype it runs in;
- DiT, one call (the largest): batch B (2 when guidance runs the prompt and the negative
  prompt as one batch: streaming mode), n tokens per call (a chunk when streaming, the whole
  video when bidirectional). Inside a block MLX holds a set of [B, n, dim] activations at
  once; we count them per block kind (see `_BLOCK_UNITS`), plus the attention scores MLX
  materialises (tiled to `layers.ATTENTION_SCORE_BUDGET` elements) and the FFN's hidden
  activation. Around the block: the latents and the solver's state, the text context, the
  streaming caches (softmax layers preallocate `sink + window` chunk slots of keys and values,
  cache.KVCache; LCHA layers keep their sums and the conv's padded input), and the RoPE tables
  cached per chunk offset;
- VAE decoder, one chunk: the chunk's pixel frames in float32 a few times over (decoder
  output, concatenation, unpatchify copy, clip) plus the previous chunk's frames still held,
  and float32 copies of float16 weights made per latent frame (type promotion);
- host memory beside MLX: the uint8 video (collected, then concatenated), float32 copies made
  converting a chunk to uint8, and the CPU kernels' per-thread attention buffers when the
  DiT was opted into them (s2dit_mlx.kernels.enable).

export coreml
- weights: a float32 numpy copy, then per function (denoise, write) the MIL constants in the
  compute dtype and the converted model's copy, and the multifunction save;
- per MIL op: Python objects of the program and its protobuf (`_MIL_BYTES_PER_BLOCK`,
  measured);
- per token of a chunk: the RoPE tables emitted as constants (two programs alive at once),
  plus the float64 tables they are computed from.

Time (generate only) is FLOPs (coreml/cost.py's analytic count of the DiT, plus the VAE) over
an assumed rate, plus a dispatch cost per MLX op and a memory-bound cost per elementwise pass
over the activations: a rough estimate, good for "this will take hours" rather than for
planning to the minute.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from .errors import S2DiTError

ALLOW_FLAG = "--allow-large"
# generate prints its time estimate above this, and refuses (without ALLOW_FLAG) above the
# next: a day of compute for one clip is almost always a typo in the sizes.
NOTE_SECONDS = 60.0
MAX_SECONDS = 24 * 3600.0

# Assumed sustained rates for the time estimate: FLOP/s of the model's matrix products, and
# the dispatch cost of one MLX op (on the 2-core CI machine a built-in-model call of ~400 ops
# takes ~10 ms, most of it dispatch).
ASSUMED_FLOPS = {"cpu": 100e9, "gpu": 4e12}
OP_SECONDS = {"cpu": 25e-6, "gpu": 10e-6}
OPS_PER_BLOCK = 70
# Elementwise work (norms, RoPE, softplus, gates: ~60 passes over a block's [B, n, dim]
# activations) is memory-bound: seconds per element per pass (~2 GB/s on MLX's CPU backend).
ELEMENT_SECONDS = {"cpu": 2e-9, "gpu": 2e-11}

# Live [B, n, dim] activations inside a block's self-attention, by kind (see module docs):
# - lcha: block input and its modulated copy (2); q, k, v (3); phi(q), phi(k) and their RoPE'd
#   copies, float32 (4); the contiguous copies batched matmuls make of transposed operands,
#   numerator and ratio (4); softplus's elementwise chain (2); the conv path's output, bias
#   and projection (3); the gated mix and output projection (4); plus the padded conv input
#   (1 + (kt - 1) / frames) counted separately;
# - full / ssa: input and modulated copy (2); q, k, v (3); RoPE'd q, k float32 (2); output
#   transpose copy, shuffle back (ssa) and projection (3); scores are counted separately.
_BLOCK_UNITS = {"lcha": 22.0, "full": 10.0, "ssa": 10.0}
# Live [B, n, dim] activations of the FFN and the cross-attention besides their own widths.
_FFN_UNITS = 5.0
_CROSS_UNITS = 5.0
# Copies of the pixel frames of one chunk alive while it is decoded (patch VAE: decoder output,
# concatenation, unpatchify copy, clip; the previous chunk's frames are counted separately).
_DECODE_COPIES = 4.0
# Wan VAE convs on MLX's own path: MLX allocates an op's output and scratch (a conv's unfolded
# input) when it queues the op, ahead of the computation, so several convs' unfolded inputs
# are alive at once. Measured on tiny Wan 2.1 VAEs at 64-256 px: peaks 2-4x the one-unfold
# model; 4 unfolds put every case within 0.8-1.2x.
_CONV_UNFOLDS_ALIVE = 4
# Python objects and protobuf of the MIL ops of one DiT block, both functions (measured on the
# built-in model: 3-3.5 MB per block whatever the width).
_MIL_BYTES_PER_BLOCK = 3.5e6
_MIL_BYTES_FIXED = 6e6


@dataclass
class Estimate:
    """An estimate of what a run needs: named memory parts (bytes) and, for generate, time."""

    what: str
    parts: dict[str, float] = field(default_factory=dict)
    mlx_bytes: float = 0.0  # of the peak, what MLX allocates (mx.get_peak_memory's view)
    peak_bytes: float = 0.0  # everything the run adds to the process
    largest_array_bytes: float = 0.0  # the largest single MLX array
    flops: float | None = None
    seconds: float | None = None

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {
            "what": self.what,
            "peak_bytes": round(self.peak_bytes),
            "mlx_bytes": round(self.mlx_bytes),
            "parts": {k: round(v) for k, v in self.parts.items()},
            "flops": self.flops,
            "seconds": self.seconds,
        }

    def summary(self) -> str:
        """'~1.2 GB of memory, ~3 min' (the time only when estimated)."""
        text = f"~{format_bytes(self.peak_bytes)} of memory"
        if self.seconds is not None:
            text += f", ~{format_seconds(self.seconds)}"
        return text


def format_bytes(n: float) -> str:
    """Bytes as '512 MB', '1.5 GB', '1.2 TB'."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value >= 100 else f"{value:.3g} {unit}"
    return f"{n / 1e6:.2f} MB"


def format_seconds(s: float) -> str:
    """Seconds as '40 s', '12 min', '3.5 h', '9 days'."""
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    if s < 3 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.0f} days"


# ----------------------------------------------------------------------------------------------
# Available memory


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> int | None:
    """Bytes left under a cgroup memory limit (v2 memory.max, v1 limit_in_bytes); None: none."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if not limit.isdigit() or int(limit) >= 1 << 60:  # "max" or v1's "no limit" sentinel
            return None
        return max(0, int(limit) - usage)
    return None


def _macos_available() -> int | None:
    """Free + inactive + purgeable + speculative pages (vm_stat), else None."""
    try:
        out = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    page, pages = 4096, 0
    for line in out.splitlines():
        if "page size of" in line:
            digits = [w for w in line.split() if w.isdigit()]
            page = int(digits[0]) if digits else page
        name, _, value = line.partition(":")
        if name.strip() in ("Pages free", "Pages inactive", "Pages purgeable", "Pages speculative"):
            try:
                pages += int(value.strip().rstrip("."))
            except ValueError:
                pass
    return pages * page if pages else None


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


@lru_cache(maxsize=1)
def memory_ceiling() -> int | None:
    """RAM + swap (Linux), or RAM: no single allocation larger than this can succeed."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return sum(int(fields[k].split()[0]) * 1024 for k in ("MemTotal", "SwapTotal"))
    except (OSError, ValueError, KeyError):
        return _physical_memory()


def available_memory() -> int | None:
    """Bytes a new allocation can get without swapping: MemAvailable (Linux) or vm_stat (macOS),
    capped by a cgroup limit; None when nothing says."""
    if sys.platform.startswith("linux"):
        avail = _meminfo_available()
    elif sys.platform == "darwin":
        avail = _macos_available()
        if avail is None:  # half the RAM: what a Mac usually has free for a foreground job
            total = _physical_memory()
            avail = total // 2 if total else None
    else:
        avail = None
    room = _cgroup_room() if sys.platform.startswith("linux") else None
    if avail is None:
        return room
    return avail if room is None else min(avail, room)


def check(estimate: Estimate, allow: bool = False, available: int | None = None) -> None:
    """Raise S2DiTError (one line) when the estimate exceeds the available memory, or (generate)
    the time bound, unless `allow`; and, allowed or not, when one array would be larger than
    the machine's memory and swap (MLX's CPU backend would crash on it)."""
    ceiling = memory_ceiling()
    if ceiling is not None and estimate.largest_array_bytes > ceiling:
        raise S2DiTError(
            f"{estimate.what} needs arrays of {format_bytes(estimate.largest_array_bytes)}, more "
            f"than this machine's {format_bytes(ceiling)} of memory and swap; choose smaller sizes"
        )
    if allow:
        return
    available = available_memory() if available is None else available
    if available is not None and estimate.peak_bytes > available:
        raise S2DiTError(
            f"{estimate.what} needs an estimated {format_bytes(estimate.peak_bytes)} of memory, "
            f"more than the {format_bytes(available)} available; choose smaller sizes, or pass "
            f"{ALLOW_FLAG} to run it anyway"
        )
    if estimate.seconds is not None and estimate.seconds > MAX_SECONDS:
        raise S2DiTError(
            f"{estimate.what} would take an estimated {format_seconds(estimate.seconds)}; "
            f"choose smaller sizes or fewer frames or steps, or pass {ALLOW_FLAG} to run it anyway"
        )


# ----------------------------------------------------------------------------------------------
# Generation


def _dtype_bytes(dtype) -> int:
    return 2 if "16" in str(dtype) else 4


def _param_bytes(module) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def _softmax_score_bytes(batch: int, heads: int, nq: int, nk: int) -> float:
    """MLX memory of one softmax attention's scores: all of them up to the tiling budget."""
    from .models.layers import ATTENTION_SCORE_BUDGET

    return 4.0 * min(batch * heads * nq * nk, ATTENTION_SCORE_BUDGET)


def dit_call_memory(
    args,
    batch: int,
    frames: int,
    latent_height: int,
    latent_width: int,
    visible_chunks: int,
    dtype_bytes: int = 4,
    cache_slots: int | None = None,
) -> dict[str, float]:
    """MLX bytes of one DiT call beyond its weights: {'activations', 'cache', 'inputs'}.

    `frames` latent frames at latent_height x latent_width; softmax layers attend to
    `visible_chunks` chunks of keys (the current one included) and keep `cache_slots` chunk
    slots of keys and values (cache.KVCache: preallocated; default visible_chunks).
    """
    from .attention import CallShape, attention_kind

    _, ph, pw = args.patch_size
    h, w = latent_height // ph, latent_width // pw
    n = frames * h * w
    d = args.dim
    unit = batch * n * d * dtype_bytes
    f32_unit = batch * n * d * 4
    heads = args.num_heads
    kt = args.lcha_conv_kernel[0]
    slots = visible_chunks if cache_slots is None else cache_slots
    worst = 0.0
    for name in set(args.layers):
        kind = attention_kind(name)
        if name == "lcha":
            # phi and RoPE run in float32 whatever the model's dtype.
            attn = (_BLOCK_UNITS["lcha"] - 8) * unit + 8 * f32_unit
            attn += unit * (1 + max(kt - 1, 0) / frames)  # the conv's padded input
        else:
            s = args.ssa_stride if name == "ssa" else 1
            nq = n // (s * s)
            nk = nq * visible_chunks
            attn = _BLOCK_UNITS.get(name, _BLOCK_UNITS["full"]) * unit
            # the visible keys and values, copied contiguous for the attention call
            attn += 2 * batch * nk * d * dtype_bytes if kind.softmax else 0
            attn += _softmax_score_bytes(batch, heads, nq, nk)
        ffn = (_FFN_UNITS + args.ffn_dim / d) * unit
        cross = _CROSS_UNITS * unit + _softmax_score_bytes(batch, heads, n, args.text_len)
        worst = max(worst, attn, ffn, cross)
    # Between blocks: the residual stream, modulation, embedded text, the call's output.
    inputs = 2 * unit + batch * frames * 7 * d * 4 + batch * args.text_len * d * dtype_bytes * 3
    cache = 0.0
    for name in args.layers:
        kind = attention_kind(name)
        if name == "lcha":
            # the padded conv input [B, frames + kt - 1, h, w, dim] a slice of which is kept
            cache += batch * (frames + kt - 1) * h * w * d * dtype_bytes
            feature = args.lcha_feature_dim or args.head_dim
            cache += batch * heads * feature * (args.head_dim + 1) * 4
        elif kind.softmax:
            s = args.ssa_stride if name == "ssa" else 1
            cache += 2 * batch * (n // (s * s)) * d * dtype_bytes * slots
        else:  # a kind we have no model for: its Core ML state, held in float32
            shape = CallShape(frames, h, w, max(slots - 1, 0), args.text_len)
            cache += batch * 2 * sum(spec.nbytes for spec in kind.coreml_states(args, shape, 0))
    return {"activations": worst, "cache": cache, "inputs": inputs}


def _visible(args, chunk: int) -> int:
    """How many chunks a query in `chunk` sees (cache.ChunkSchedule.visible), counted in O(1)."""
    if args.window is None:
        return chunk + 1
    recent = min(args.window, chunk + 1)  # chunks chunk - recent + 1 .. chunk
    sinks = min(args.sink, chunk + 1)  # chunks 0 .. sinks - 1
    return recent + sinks - max(0, sinks - (chunk - recent + 1))


def _cache_slots(args, chunks: int) -> int:
    """Chunk slots a KVCache holds by the last of `chunks` chunks (cache.KVCache's layout)."""
    from .cache import ChunkSchedule, KVCache

    schedule = ChunkSchedule(args.window, args.sink)
    if schedule.bounded:
        return schedule.past_slots + 1
    return chunks + KVCache.GROW


def _decode_memory(vae, frames_per_chunk: int, latent_height: int, latent_width: int) -> dict:
    """MLX bytes of decoding one chunk (beyond weights), and the chunk's float32 frame bytes."""
    tf, sf = vae.temporal_factor, vae.spatial_factor
    frame_px = latent_height * sf * latent_width * sf * 3
    chunk_frames_bytes = 4.0 * frames_per_chunk * tf * frame_px
    config = getattr(vae, "config", None)
    if getattr(config, "type", "patch") == "wan":
        decode = _wan_decode_bytes(vae, latent_height, latent_width, _direct_conv(vae))
        return {"decode": decode + 2 * chunk_frames_bytes, "frames": chunk_frames_bytes}
    hidden = getattr(config, "hidden_dim", 0)
    # float32 copies of float16 weights, made per latent frame by type promotion
    weights = _param_bytes(vae.decoder_module) if hasattr(vae, "decoder_module") else 0
    promoted = 0.0 if weights == 0 or _vae_is_f32(vae) else 2.0 * weights * frames_per_chunk
    hidden_bytes = 4.0 * 4 * latent_height * latent_width * hidden  # a few hidden maps
    return {
        "decode": _DECODE_COPIES * chunk_frames_bytes + hidden_bytes + promoted,
        "frames": chunk_frames_bytes,
    }


def _vae_is_f32(vae) -> bool:
    from mlx.utils import tree_flatten

    return all("32" in str(v.dtype) for _, v in tree_flatten(vae.parameters()))


def _direct_conv(vae) -> bool:
    """Whether the Wan VAE's convs run on the CPU kernels' direct convolution (which unfolds
    nothing): opted into them (kernels.enable) and the kind chosen, which measures it now if
    it was not yet (its first use: the generation is about to start)."""
    from . import kernels

    return "conv3d" in kernels.enabled_kinds(vae) and kernels.use("conv3d")


def _wan_decode_bytes(vae, latent_height: int, latent_width: int, direct: bool = False) -> float:
    """Wan VAE, one latent frame per pass, at full size or one tile: the widest level's
    activations (a few live copies), every causal conv's cache of 2 input frames, the convs'
    unfolded inputs (MLX unfolds up to wan_vae's budget, then per-tap matmuls;
    _CONV_UNFOLDS_ALIVE at once; none with the kernels' `direct` convolution) and the mid
    block's attention scores (the chunk's frames are added by the caller)."""
    from .models import wan_vae

    cfg = vae.config
    tile = getattr(vae, "_tile", None)
    sf = vae.spatial_factor
    lh, lw = latent_height, latent_width
    if tile is not None:
        lh, lw = min(lh, tile[0] // sf), min(lw, tile[0] // sf)
    dims = [cfg.dec_dim * m for m in [cfg.dim_mult[-1], *cfg.dim_mult[::-1]]]
    convs = 2 * (cfg.num_res_blocks + 1) + 1
    up_t = 1
    worst = cache = unfold = 0.0
    for i in range(len(dims) - 1):
        positions = up_t * lh * lw * 4**i
        channels = dims[i + 1]
        worst = max(worst, 4 * 4.0 * positions * channels)
        cache += convs * 2 * 4.0 * lh * lw * 4**i * channels
        in_out = 2 * 4.0 * positions * channels
        unfolded = 27 * 4.0 * positions * channels
        unfold = max(unfold, min(unfolded, max(wan_vae._CONV_UNFOLD_BUDGET, 2 * in_out)))
        if i < len(cfg.temporal_down) and cfg.temporal_down[::-1][i]:
            up_t *= 2
    tokens = lh * lw
    attention = 4.0 * min(tokens * tokens, wan_vae._ATTN_SCORE_BUDGET) + 3 * 4.0 * tokens * dims[0]
    unfold = 0.0 if direct else _CONV_UNFOLDS_ALIVE * unfold
    return worst + cache + max(unfold, attention)


def estimate_generate(pipe, settings, threads: int | None = None) -> Estimate:
    """Peak memory and time of `pipe.generate(**settings)` (settings: a GenerationSettings)."""
    from . import kernels

    dit, vae = pipe.dit, pipe.vae
    args = dit.args
    dtype_bytes = _dtype_bytes(pipe.dtype)
    sf, tf = vae.spatial_factor, vae.temporal_factor
    lh, lw = settings.height // sf, settings.width // sf
    latent_frames = 1 + (settings.frames - 1) // tf
    use_cfg = settings.guidance != 1.0
    streaming = settings.mode == "streaming"
    per_chunk = max(1, int(getattr(args, "frames_per_chunk", latent_frames) or latent_frames))
    if streaming:
        call_frames = min(per_chunk, latent_frames)
        chunks = math.ceil(latent_frames / per_chunk)
        batch = 2 if use_cfg else 1
        visible = _visible(args, chunks - 1)  # never fewer in a later chunk
        slots = _cache_slots(args, chunks)
    else:
        call_frames, chunks, batch, visible, slots = latent_frames, 1, 1, 1, 0
    call = dit_call_memory(args, batch, call_frames, lh, lw, visible, dtype_bytes, slots)
    latent_bytes = latent_frames * lh * lw * args.in_dim * 4.0
    solver_state = 4 * (
        latent_bytes if not streaming else latent_bytes * call_frames / latent_frames
    )
    _, ph, pw = args.patch_size
    tokens_full = call_frames * (lh // ph) * (lw // pw)
    rope_entries = min(64, 2 * chunks) if streaming else 2
    rope = rope_entries * tokens_full * args.head_dim * 4.0  # cos and sin, full + low grids
    dec = _decode_memory(vae, min(per_chunk, latent_frames), lh, lw)
    weights = _param_bytes(dit) + _param_bytes(vae) + _param_bytes(pipe.text_encoder)
    dit_phase = call["activations"] + call["inputs"]
    held = call["cache"] + solver_state + rope
    mlx_peak = weights + held + max(dit_phase, dec["decode"] + dec.get("frames", 0.0))
    video_bytes = settings.frames * settings.height * settings.width * 3.0
    host_frames = 2 * video_bytes + 4 * dec.get("frames", 0.0)
    # The CPU kernels' attention buffers, when the DiT was opted into them.
    nq = tokens_full // (args.ssa_stride**2 if "ssa" in args.layers else 1)
    kernel_scratch = kernels.attention_scratch_bytes(
        dit, args.num_heads, nq, nq * visible, args.head_dim, threads
    )
    parts = {
        "weights": weights,
        "dit_activations": dit_phase,
        "dit_cache": call["cache"],
        "latents_and_rope": solver_state + rope,
        "vae_decode": dec["decode"] + dec.get("frames", 0.0),
        "host_frames": host_frames,
        "kernel_scratch": kernel_scratch,
    }
    tokens_call = batch * tokens_full
    largest = max(
        tokens_call * max(args.dim, args.ffn_dim) * 4.0,  # a block's activations, FFN hidden
        dec.get("frames", 0.0),  # a chunk's pixel frames, float32
    )
    estimate = Estimate(
        what=f"generating {settings.frames} frames at {settings.width}x{settings.height}",
        parts=parts,
        mlx_bytes=mlx_peak,
        peak_bytes=mlx_peak + host_frames + kernel_scratch,
        largest_array_bytes=largest,
    )
    estimate.flops, estimate.seconds = _generate_time(
        args, vae, settings, streaming, chunks, per_chunk, latent_frames, batch, use_cfg
    )
    return estimate


def _generate_time(args, vae, settings, streaming, chunks, per_chunk, latent_frames, batch, cfg):
    """(FLOPs, seconds) of a generation: DiT calls from coreml/cost.py, the VAE decode, and
    a dispatch cost per op, over the assumed rates of this device."""
    import mlx.core as mx

    from .coreml.cost import call_flops

    sf = vae.spatial_factor
    lh, lw = settings.height // sf, settings.width // sf
    _, ph, pw = args.patch_size
    flops = elements = 0.0
    calls = 0
    if streaming:
        # Each chunk: `steps` solver calls and one cache write, at the doubled batch with CFG.
        cost: dict[tuple[int, int], float] = {}  # most chunks repeat the same shapes
        for c in range(chunks):
            frames = min(per_chunk, latent_frames - c * per_chunk)
            key = (frames, _visible(args, c))
            if key not in cost:
                cost[key] = call_flops(args, frames, lh, lw, key[1], 0)["total"]
            call = cost[key]
            flops += call * batch * (settings.steps + 1)
            calls += settings.steps + 1
            elements += batch * frames * (lh // ph) * (lw // pw) * (settings.steps + 1)
    else:
        call = call_flops(args, latent_frames, lh, lw, 1, 0)["total"]
        passes = 2 if cfg else 1
        flops += call * settings.steps * passes
        calls += settings.steps * passes
        elements += latent_frames * (lh // ph) * (lw // pw) * settings.steps * passes
    flops += _decode_flops(vae, latent_frames, lh, lw)
    device = "gpu" if mx.default_device() == mx.gpu else "cpu"
    ops = calls * (len(args.layers) + 2) * OPS_PER_BLOCK
    elements *= args.dim * len(args.layers) * 60
    seconds = (
        flops / ASSUMED_FLOPS[device]
        + ops * OP_SECONDS[device]
        + elements * ELEMENT_SECONDS[device]
    )
    return flops, seconds


def _decode_flops(vae, latent_frames: int, lh: int, lw: int) -> float:
    """Multiply-adds x 2 of decoding every latent frame (patch VAE exactly, Wan VAE roughly)."""
    cfg = vae.config
    if getattr(cfg, "type", "patch") == "wan":
        dims = [cfg.dec_dim * m for m in [cfg.dim_mult[-1], *cfg.dim_mult[::-1]]]
        total, up_t = 0.0, 1
        for i in range(len(dims) - 1):
            pixels = lh * lw * 4**i
            convs = 2 * (cfg.num_res_blocks + 1)
            total += convs * 27 * dims[i + 1] ** 2 * pixels * up_t
            if i < len(cfg.temporal_down) and cfg.temporal_down[::-1][i]:
                up_t *= 2
        return 2.0 * total * latent_frames
    k = cfg.temporal_kernel * cfg.spatial_kernel**2 * cfg.z_dim * cfg.hidden_dim
    k += 2 * cfg.mlp_blocks * cfg.hidden_dim**2
    k += cfg.hidden_dim * cfg.temporal_factor * cfg.spatial_factor**2 * 3
    return 2.0 * k * lh * lw * latent_frames


# ----------------------------------------------------------------------------------------------
# Core ML export


def _rope_axes(head_dim: int) -> tuple[int, int]:
    """(columns of the constant height/width angle table, columns of a table row)."""
    from .models.layers import rope_axis_dims

    _, dh, dw = rope_axis_dims(head_dim)
    return dh // 2 + dw // 2, head_dim


def estimate_export(
    dit,
    vae,
    shapes,
    height: int,
    width: int,
    precision: str = "float16",
    compress_mode: str = "none",
) -> Estimate:
    """Peak memory of `export_coreml` at height x width pixels, `shapes` being what
    export.check_export returned for them."""
    args = dit.args
    compute = 2 if precision == "float16" else 4
    f32_weights = 4.0 * _param_count(dit)
    # numpy float32 copy; per function its MIL constants and the converted model's copy;
    # the multifunction save; compression works on yet another float32 copy.
    copies = 1 + 2 * (2 * compute / 4) + compute / 4 + (1 if compress_mode != "none" else 0)
    weights = copies * f32_weights
    ops = _MIL_BYTES_FIXED + _MIL_BYTES_PER_BLOCK * len(args.layers)
    frames, h, w = shapes.grid(args.patch_size)
    grids = []
    if any(k in ("lcha", "full") for k in args.layers):
        grids.append(frames * h * w)
    if "ssa" in args.layers:
        s = args.ssa_stride
        grids.append(frames * (h // s) * (w // s))
    columns, _ = _rope_axes(args.head_dim)
    const_per_token = 8 * columns + 4  # float32 cos and sin of the height/width angles, t_pos
    # building a table: int64 and float64 positions, the float64 angles and their cos
    build_per_token = 48 + 24 * columns
    tables = 2 * const_per_token * sum(grids) + build_per_token * max(grids, default=0)
    dit_phase = weights + ops + tables
    vae_phase = 0.0
    if vae is not None:
        vae_weights = 4.0 * _param_count(vae)
        vae_phase = copies * vae_weights + _MIL_BYTES_FIXED
    parts = {
        "weights": weights,
        "mil_ops": ops,
        "rope_tables": tables,
        "vae_decoder": vae_phase,
    }
    peak = max(dit_phase, vae_phase)
    return Estimate(
        what=f"exporting at {width}x{height}",
        parts=parts,
        mlx_bytes=0.0,
        peak_bytes=peak,
    )


def _param_count(module) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(module.parameters()))
