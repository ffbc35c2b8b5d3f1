"""MIL emitter for the Wan VAE decoder (models/wan_vae.py, 2.1 and 2.2): one latent frame a call.

Two functions in one package, sharing weights and states:
- `first`: latent frame 0 of a video [1, 1, h, w, z] -> 1 pixel frame [1, 1, H, W, 3]. It reads
  no state (every causal history starts as zeros, as a time pad) and writes every state, so it
  also starts a new video: the app never has to zero the states itself.
- `decode`: each later latent frame -> 4 pixel frames [1, 4, H, W, 3], reading and writing the
  states.
Both take the normalised latents the DiT makes and return frames clipped to [-1, 1].

States (fp16, channels-first [1, C, 2, h', w'] at the conv's own resolution): the last 2 input
frames of every causal conv with a temporal kernel of 3 (`conv_history`), the temporal
upsamplers' time convs included (`time_conv_history`; Wan skips the time conv for frame 0, so
`first` writes zeros there). The graph is channels-first [1, C, T, h, w] throughout, so every
conv is a MIL conv; the frames are turned channels-last at the end.
"""

from __future__ import annotations

import re

import numpy as np

from ..errors import S2DiTError
from ..models.wan_vae import (
    CausalConv3d,
    MidBlock,
    Resample,
    ResidualBlock,
    ResidualUpBlock,
    UpBlock,
)
from .emit import DTYPES, Ctx, Function, Program, StateSpec, ct, mb, types

FUNCTIONS = ("first", "decode")  # in this order; `decode` is the package's default
# RMS norm in fp16: channels are divided by their peak before squaring (no fp16 overflow of the
# sum of squares, whatever the activations' size). Peaks below PEAK_FLOOR count as PEAK_FLOOR,
# and the mean square is kept >= MS_FLOOR (the smallest normal fp16; the mean square of a
# peak-scaled vector is >= 1/C otherwise), so an all-zero position gives 0, not NaN.
PEAK_FLOOR = 1e-4
MS_FLOOR = 6.1035e-05


def _scale_of(name: str, levels: int) -> int:
    """Upsampling factor (vs the latent grid) at which a decoder conv named `name` runs."""
    m = re.match(r"up_blocks\.(\d+)\.", name)
    if m:
        return 2 ** int(m[1])
    return 2 ** (levels - 1) if name.startswith("conv_out") else 1


def _order_key(name: str) -> tuple:
    """Decoder order: conv_in, mid block, up blocks (numerically), conv_out."""
    group = 0 if name.startswith("conv_in") else 1 if name.startswith("mid_block") else 3
    if name.startswith("up_blocks"):
        group = 2
    return (group, [int(t) if t.isdigit() else t for t in name.split(".")])


def state_name(module_path: str) -> str:
    """Core ML state name of the causal conv at `module_path` inside the decoder."""
    return "vae_" + module_path.replace(".", "_")


def wan_state_specs(vae, latent_height: int, latent_width: int) -> list[StateSpec]:
    """Every causal conv's 2-frame history, in decoder order."""
    levels = vae.config.levels
    convs = [
        (name, m)
        for name, m in vae.decoder_module.named_modules()
        if isinstance(m, CausalConv3d) and m.kt > 1
    ]
    specs = []
    for name, m in sorted(convs, key=lambda nm: _order_key(nm[0])):
        s = _scale_of(name, levels)
        shape = (1, m.weight.shape[-1], m.kt - 1, latent_height * s, latent_width * s)
        kind = "time_conv_history" if name.endswith("time_conv") else "conv_history"
        specs.append(StateSpec(state_name(name), shape, -1, kind))
    return specs


def check_wan_vae(vae) -> None:
    """Raise S2DiTError unless this emitter covers the Wan VAE's decoder."""
    cfg = vae.config
    if cfg.version not in ("2.1", "2.2"):
        raise S2DiTError(f"Core ML export: unsupported Wan VAE version {cfg.version!r}")


class _Emitter:
    """One function's emission: the decoder walked module by module, channels-first."""

    def __init__(self, vae, ctx: Ctx, first: bool, states: dict):
        self.vae, self.ctx, self.first, self.states = vae, ctx, first, states

    # -- building blocks -----------------------------------------------------------------------

    def conv(self, x, prefix: str, weight: np.ndarray, pad_t: int = 0):
        """MIL conv3d, zero 'same' padding in space; `weight` is [O, I, kt, kh, kw]."""
        kh, kw = weight.shape[3:]
        return mb.conv(
            x=x,
            weight=self.ctx.w(prefix + ".weight", weight),
            bias=self.ctx.w(prefix + ".bias"),
            strides=[1, 1, 1],
            pad_type="custom",
            pad=[pad_t, 0, kh // 2, kh // 2, kw // 2, kw // 2],
            dilations=[1, 1, 1],
            groups=1,
        )

    def causal_conv(self, x, path: str):
        """CausalConv3d at decoder path `path`: the last kt - 1 input frames come from its state."""
        prefix = "decoder_module." + path
        weight = self.ctx.weights[prefix + ".weight"].transpose(0, 4, 1, 2, 3)
        kt = weight.shape[2]
        if kt > 1:
            _, c, t, h, w = x.shape
            state = self.states[state_name(path)]
            if self.first:
                zero = self.ctx.np_dtype(0.0)
                padded = mb.pad(
                    x=x, pad=[kt - 1, 0, 0, 0, 0, 0], mode="constant", constant_val=zero
                )
            else:
                past = self.ctx.to_compute(mb.read_state(input=state))
                padded = mb.concat(values=[past, x], axis=2)
            last = mb.slice_by_index(x=padded, begin=[0, 0, t, 0, 0], end=[1, c, t + kt - 1, h, w])
            mb.coreml_update_state(state=state, value=self.ctx.to_state(last))
            x = padded
        return self.conv(x, prefix, weight)

    def rms_norm(self, x, path: str):
        """RMS norm over channels (axis 1), peak-scaled first to stay finite in fp16."""
        ctx = self.ctx
        peak = mb.reduce_max(x=mb.abs(x=x), axes=[1], keep_dims=True)
        xs = mb.real_div(x=x, y=mb.maximum(x=peak, y=ctx.c(PEAK_FLOOR)))
        ms = mb.reduce_mean(x=mb.mul(x=xs, y=xs), axes=[1], keep_dims=True)
        r = mb.rsqrt(x=mb.maximum(x=ms, y=ctx.c(MS_FLOOR)), epsilon=ctx.np_dtype(1e-12))
        name = f"decoder_module.{path}.gamma"
        gamma = ctx.weights[name].reshape(1, -1, 1, 1, 1)
        return mb.mul(x=mb.mul(x=xs, y=r), y=ctx.w(name, gamma))

    def residual(self, x, path: str, block: ResidualBlock):
        """norm -> SiLU -> causal conv, twice, plus the (1x1x1 conv) shortcut."""
        h = x
        if "conv_shortcut" in block:
            prefix = f"decoder_module.{path}.conv_shortcut"
            h = self.conv(x, prefix, self.ctx.weights[prefix + ".weight"].transpose(0, 4, 1, 2, 3))
        x = self.causal_conv(mb.silu(x=self.rms_norm(x, path + ".norm1")), path + ".conv1")
        x = self.causal_conv(mb.silu(x=self.rms_norm(x, path + ".norm2")), path + ".conv2")
        return mb.add(x=x, y=h)

    def attention(self, x, path: str):
        """Single-head self-attention over each frame's h*w positions, plus the input."""
        ctx = self.ctx
        _, c, t, h, w = x.shape
        prefix = "decoder_module." + path
        y = mb.transpose(x=self.rms_norm(x, path + ".norm"), perm=[0, 2, 3, 4, 1])
        y = mb.reshape(x=y, shape=[t, h * w, c])
        qkv_w = ctx.weights[prefix + ".to_qkv.weight"].reshape(3 * c, c)
        qkv = mb.linear(
            x=y,
            weight=ctx.w(prefix + ".to_qkv.weight", qkv_w),
            bias=ctx.w(prefix + ".to_qkv.bias"),
        )
        q, k, v = (
            mb.slice_by_index(x=qkv, begin=[0, 0, i * c], end=[t, h * w, (i + 1) * c])
            for i in range(3)
        )
        # SDPA's scale 1/sqrt(c) is the block's own.
        o = mb.scaled_dot_product_attention(query=q, key=k, value=v)
        o = mb.linear(
            x=o,
            weight=ctx.w(
                prefix + ".proj.weight", ctx.weights[prefix + ".proj.weight"].reshape(c, c)
            ),
            bias=ctx.w(prefix + ".proj.bias"),
        )
        o = mb.transpose(x=mb.reshape(x=o, shape=[1, t, h, w, c]), perm=[0, 4, 1, 2, 3])
        return mb.add(x=x, y=o)

    def mid(self, x, path: str, block: MidBlock):
        x = self.residual(x, path + ".resnets.0", block.resnets[0])
        x = self.attention(x, path + ".attentions.0")
        return self.residual(x, path + ".resnets.1", block.resnets[1])

    def time_up(self, x, path: str):
        """The causal time conv makes 2C channels = 2 frames per input frame (channel halves)."""
        _, c, t, h, w = x.shape
        y = self.causal_conv(x, path + ".time_conv")  # [1, 2C, T, h, w]
        y = mb.transpose(x=mb.reshape(x=y, shape=[2, c, t, h * w]), perm=[1, 2, 0, 3])
        return mb.reshape(x=y, shape=[1, c, 2 * t, h, w])

    def resample(self, x, path: str, block: Resample):
        """Upsample: (time x2 unless first) then nearest x2 in space and a 3x3 conv."""
        ctx = self.ctx
        if block.mode == "upsample3d":
            if not self.first:
                x = self.time_up(x, path)
            else:
                # Frame 0 is not doubled in time; the time conv's history starts from zeros.
                state = self.states[state_name(path + ".time_conv")]
                zeros = mb.tile(x=mb.mul(x=x, y=ctx.c(0.0)), reps=[1, 1, 2, 1, 1])
                mb.coreml_update_state(state=state, value=ctx.to_state(zeros))
        elif block.mode != "upsample2d":
            raise S2DiTError(f"Core ML export: unexpected decoder resample {block.mode!r}")
        _, c, t, h, w = x.shape
        y = mb.upsample_nearest_neighbor(
            x=mb.reshape(x=x, shape=[1, c * t, h, w]), scale_factor_height=2, scale_factor_width=2
        )
        y = mb.reshape(x=y, shape=[1, c, t, 2 * h, 2 * w])
        prefix = f"decoder_module.{path}.resample.1"
        weight = ctx.weights[prefix + ".weight"].transpose(0, 3, 1, 2)[:, :, None]
        return self.conv(y, prefix, weight)

    def dup_up(self, x, out_dim: int, ft: int):
        """Wan 2.2's shortcut: repeat channels, then depth-to-space (2x2) and -time (ft)."""
        _, c, t, h, w = x.shape
        k = out_dim * ft * 4  # channel k = ((o * ft + a) * 2 + bh) * 2 + bw
        y = mb.tile(x=mb.reshape(x=x, shape=[c, 1, t * h * w]), reps=[1, k // c, 1])
        y = mb.transpose(x=mb.reshape(x=y, shape=[k // 2, 2, t * h, w]), perm=[0, 2, 3, 1])
        y = mb.reshape(x=y, shape=[k // 4, 2, t * h, 2 * w])
        y = mb.transpose(x=y, perm=[0, 2, 1, 3])  # [k/4, t*h, 2, 2w]
        y = mb.reshape(x=y, shape=[out_dim, ft, t, 4 * h * w])
        if ft > 1:
            y = mb.transpose(x=y, perm=[0, 2, 1, 3])
        y = mb.reshape(x=y, shape=[1, out_dim, t * ft, 2 * h, 2 * w])
        if self.first and ft > 1:
            y = mb.slice_by_index(
                x=y, begin=[0, 0, ft - 1, 0, 0], end=[1, out_dim, t * ft, 2 * h, 2 * w]
            )
        return y

    def up_block(self, x, path: str, block):
        if isinstance(block, UpBlock):  # 2.1
            for j, resnet in enumerate(block.resnets):
                x = self.residual(x, f"{path}.resnets.{j}", resnet)
            if "upsamplers" in block:
                x = self.resample(x, path + ".upsamplers.0", block.upsamplers[0])
            return x
        if not isinstance(block, ResidualUpBlock):
            raise S2DiTError(f"Core ML export: unexpected decoder block {type(block).__name__}")
        skip = None
        if "upsampler" in block:
            skip = self.dup_up(x, block.out_dim, block.ft)
        for j, resnet in enumerate(block.resnets):
            x = self.residual(x, f"{path}.resnets.{j}", resnet)
        if skip is None:
            return x
        return mb.add(x=self.resample(x, path + ".upsampler", block.upsampler), y=skip)

    # -- the whole call ------------------------------------------------------------------------

    def decode(self, latents):
        """Normalised latents [1, 1, h, w, z] -> frames [1, T, H, W, 3] in [-1, 1]."""
        vae, ctx = self.vae, self.ctx
        cfg = vae.config
        _, _, h, w, z = latents.shape
        mean = np.asarray(cfg.latents_mean or [0.0] * z, np.float32)
        std = np.asarray(cfg.latents_std or [1.0] * z, np.float32)
        x = mb.add(x=mb.mul(x=latents, y=ctx.c(std)), y=ctx.c(mean))
        x = mb.reshape(x=x, shape=[1, h * w, z])
        pq = ctx.weights["post_quant_conv.weight"].reshape(z, z)
        x = mb.linear(
            x=x,
            weight=ctx.w("post_quant_conv.weight", pq),
            bias=ctx.w("post_quant_conv.bias"),
        )
        x = mb.transpose(x=mb.reshape(x=x, shape=[1, 1, h, w, z]), perm=[0, 4, 1, 2, 3])
        dec = vae.decoder_module
        x = self.causal_conv(x, "conv_in")
        x = self.mid(x, "mid_block", dec.mid_block)
        for i, block in enumerate(dec.up_blocks):
            x = self.up_block(x, f"up_blocks.{i}", block)
        x = self.causal_conv(mb.silu(x=self.rms_norm(x, "norm_out")), "conv_out")
        return self.frames(x)

    def frames(self, x):
        """[1, 3*p*p, T, h, w] -> [1, T, h*p, w*p, 3] (unpatchify, Wan's (c, w, h) order)."""
        p = self.vae.config.patch_size
        _, io, t, h, w = x.shape
        if p == 1:
            x = mb.transpose(x=x, perm=[0, 2, 3, 4, 1])
        else:
            x = mb.transpose(x=mb.reshape(x=x, shape=[io, t * h * w]), perm=[1, 0])
            x = mb.reshape(x=x, shape=[t * h, w, 3, p, p])  # (c, w-offset, h-offset)
            x = mb.transpose(x=x, perm=[0, 4, 1, 3, 2])
            x = mb.reshape(x=x, shape=[1, t, h * p, w * p, 3])
        c = self.ctx
        return mb.clip(x=x, alpha=c.np_dtype(-1.0), beta=c.np_dtype(1.0), name="frames")


def wan_decoder_programs(
    vae, weights: dict, latent_height: int, latent_width: int, dtype: str
) -> dict[str, Program]:
    """The `first` and `decode` calls as MIL programs (one function `main` each)."""
    check_wan_vae(vae)
    specs = wan_state_specs(vae, latent_height, latent_width)
    tdt = DTYPES[dtype][1]
    shape = (1, 1, latent_height, latent_width, vae.config.z_dim)
    programs = {}
    for name in FUNCTIONS:
        inputs = {"latents": mb.placeholder(shape=shape, dtype=tdt)}
        for spec in specs:
            inputs[spec.name] = mb.state_tensor_placeholder(shape=spec.shape, dtype=types.fp16)
        ctx = Ctx(dtype=dtype, weights=weights, write=True)
        with Function(inputs, opset_version=ct.target.iOS18) as func:
            states = {s.name: func.inputs[s.name] for s in specs}
            emitter = _Emitter(vae, ctx, first=name == "first", states=states)
            func.set_outputs([emitter.decode(func.inputs["latents"])])
        prog = Program()
        prog.add_function("main", func)
        programs[name] = prog
    return programs


__all__ = ["FUNCTIONS", "check_wan_vae", "state_name", "wan_decoder_programs", "wan_state_specs"]
