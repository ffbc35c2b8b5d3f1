"""The Wan video VAE (2.1: z=16, 4x8x8; 2.2: z=48, 4x16x16 with a 2x2 patchify), channels-last.

Causal in time: a video of 1 + 4k frames is encoded chunk by chunk (the first frame alone,
then 4 frames per latent frame) and decoded one latent frame at a time. Every causal conv
with a temporal kernel of 3 keeps the last 2 frames it was fed (the "feature cache"), so
streaming decode across separate calls gives the frames of a one-shot decode.

Any width works (`base_dim`), so the same code serves the published VAEs and small ones
trained for the built-in default model.

Parameter names (ours) are the diffusers `AutoencoderKLWan` names, except that the decoder
network lives under `decoder_module.` (diffusers: `decoder.`), because `decoder()` is the
pipeline's streaming-decoder factory. `sanitize()` accepts the diffusers names, the original
Wan names (`Wan2.1_VAE.pth` / `Wan2.2_VAE.pth`: `encoder.downsamples.N`, `conv1`, `conv2`,
`decoder.upsamples.N`, ...) and our own, in PyTorch or MLX layouts.

Reading guide for the cache: `cache` is a dict owned by the caller (one per video, per
spatial tile), keyed by `id(module)`; `first` is True for the pass that contains the video's
first frame (Wan treats that frame specially in its temporal down/up-samplers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..cache import ConvHistories, ConvHistory
from ..config import ConfigBase
from ..errors import S2DiTError
from ..validate import check_field_types
from .interfaces import LatentSpace, StreamingDecoder
from .layers import ScaledDotProductAttention

# Published latent statistics (per channel): latents are stored as (z - mean) / std.
WAN21_LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]  # fmt: skip
WAN21_LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]  # fmt: skip
WAN22_LATENTS_MEAN = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
]  # fmt: skip
WAN22_LATENTS_STD = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
]  # fmt: skip

VERSIONS = ("2.1", "2.2")
# Attention over h*w tokens is unfused on the CPU: bound its score matrix to ~this many floats.
_ATTN_SCORE_BUDGET = 64 * 1024 * 1024
# Largest unfolded conv input (bytes) left to mx.conv*; bigger convs use per-tap matmuls.
_CONV_UNFOLD_BUDGET = 64 * 1024 * 1024


@dataclass
class WanVAEConfig(ConfigBase):
    """Config of a Wan VAE (the `vae` entry of a model folder, type "wan").

    Defaults are the Wan 2.1 architecture with identity latent normalisation; use
    `WanVAEConfig.wan21()` / `.wan22()` for the published VAEs.
    """

    config_name: ClassVar[str] = "Wan VAE config"

    type: str = "wan"
    # "2.1": plain residual stacks; "2.2": residual down/up blocks with avg/dup shortcuts
    # and same-width upsampling convs.
    version: str = "2.1"
    base_dim: int = 96
    decoder_base_dim: int | None = None  # None: base_dim (2.2 published: 256)
    z_dim: int = 16
    dim_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    # Kept for config compatibility; must be empty (the published VAEs have no attention
    # outside the middle blocks, and both reference implementations crash on other values).
    attn_scales: list[float] = field(default_factory=list)
    temperal_downsample: list[bool] = field(default_factory=lambda: [False, True, True])
    patch_size: int = 1  # 2.2 published: 2 (pixels are space-to-depth'd before the encoder)
    latents_mean: list[float] = field(default_factory=list)  # empty: 0
    latents_std: list[float] = field(default_factory=list)  # empty: 1

    @classmethod
    def wan21(cls) -> WanVAEConfig:
        """The published Wan 2.1 VAE (z=16, 4x8x8)."""
        return cls(
            version="2.1",
            latents_mean=list(WAN21_LATENTS_MEAN),
            latents_std=list(WAN21_LATENTS_STD),
        )

    @classmethod
    def wan22(cls) -> WanVAEConfig:
        """The published Wan 2.2 VAE (z=48, 4x16x16)."""
        return cls(
            version="2.2",
            base_dim=160,
            decoder_base_dim=256,
            z_dim=48,
            patch_size=2,
            latents_mean=list(WAN22_LATENTS_MEAN),
            latents_std=list(WAN22_LATENTS_STD),
        )

    @classmethod
    def from_diffusers_config(cls, d: dict) -> WanVAEConfig:
        """Build from a diffusers `AutoencoderKLWan` config.json dict."""
        base = cls()
        return cls(
            version="2.2" if d.get("is_residual", False) else "2.1",
            base_dim=d.get("base_dim", base.base_dim),
            decoder_base_dim=d.get("decoder_base_dim"),
            z_dim=d.get("z_dim", base.z_dim),
            dim_mult=list(d.get("dim_mult", base.dim_mult)),
            num_res_blocks=d.get("num_res_blocks", base.num_res_blocks),
            attn_scales=list(d.get("attn_scales", [])),
            temperal_downsample=list(d.get("temperal_downsample", base.temperal_downsample)),
            patch_size=d.get("patch_size") or 1,
            latents_mean=list(d.get("latents_mean", WAN21_LATENTS_MEAN)),
            latents_std=list(d.get("latents_std", WAN21_LATENTS_STD)),
        )

    @property
    def dec_dim(self) -> int:
        return self.decoder_base_dim or self.base_dim

    @property
    def levels(self) -> int:
        return len(self.dim_mult)

    @property
    def temporal_down(self) -> list[bool]:
        """Per down level (all but the last): halves time?"""
        return [bool(t) for t in self.temperal_downsample[: self.levels - 1]]

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_down)

    @property
    def spatial_factor(self) -> int:
        return self.patch_size * 2 ** (self.levels - 1)

    @property
    def io_channels(self) -> int:
        """Channels the encoder reads and the decoder writes (RGB after patchify)."""
        return 3 * self.patch_size**2

    def validate(self) -> None:
        """Raise S2DiTError on an inconsistent config."""
        where = "Wan VAE config"
        check_field_types(self, where)
        if self.type != "wan":
            raise S2DiTError(f"{where} has type {self.type!r}, expected 'wan'")
        if self.version not in VERSIONS:
            raise S2DiTError(f"{where}: version must be one of {VERSIONS}, got {self.version!r}")
        for name in ("base_dim", "z_dim", "num_res_blocks", "patch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise S2DiTError(f"{where}: {name} must be a positive integer, got {value!r}")
        if self.decoder_base_dim is not None and (
            not isinstance(self.decoder_base_dim, int) or self.decoder_base_dim < 1
        ):
            raise S2DiTError(f"{where}: decoder_base_dim must be a positive integer or null")
        if not self.dim_mult or any(not isinstance(m, int) or m < 1 for m in self.dim_mult):
            raise S2DiTError(f"{where}: dim_mult must be a non-empty list of positive integers")
        if self.attn_scales:
            raise S2DiTError(f"{where}: attn_scales must be empty, got {self.attn_scales!r}")
        if len(self.temperal_downsample) < self.levels - 1:
            raise S2DiTError(
                f"{where}: temperal_downsample needs {self.levels - 1} entries for "
                f"{self.levels} levels, got {len(self.temperal_downsample)}"
            )
        if self.version == "2.1":
            dims = [self.dec_dim * m for m in [self.dim_mult[-1], *self.dim_mult[::-1]]]
            if any(d % 2 for d in dims[1:-1]):
                raise S2DiTError(f"{where}: 2.1 decoder widths must be even, got {dims}")
        else:
            self._check_shortcut_groups(where)
        for name in ("latents_mean", "latents_std"):
            value = getattr(self, name)
            if value and len(value) != self.z_dim:
                raise S2DiTError(
                    f"{where}: {name} has {len(value)} entries, expected z_dim={self.z_dim}"
                )
        if any(s <= 0 for s in self.latents_std):
            raise S2DiTError(f"{where}: latents_std entries must be > 0")

    def _check_shortcut_groups(self, where: str) -> None:
        # 2.2's parameter-free shortcuts average / repeat channel groups: sizes must divide.
        enc = [self.base_dim * m for m in [1, *self.dim_mult]]
        dec = [self.dec_dim * m for m in [self.dim_mult[-1], *self.dim_mult[::-1]]]
        td = self.temporal_down
        for i in range(self.levels - 1):
            f = (2 if td[i] else 1) * 4
            if enc[i] * f % enc[i + 1]:
                raise S2DiTError(f"{where}: encoder level {i}: {enc[i]}*{f} % {enc[i + 1]} != 0")
            fu = (2 if td[::-1][i] else 1) * 4
            if dec[i + 1] * fu % dec[i]:
                raise S2DiTError(f"{where}: decoder level {i}: {dec[i + 1]}*{fu} % {dec[i]} != 0")


# ----------------------------------------------------------------------------------------------
# Layers


def _conv_taps(x: mx.array, weight: mx.array) -> mx.array:
    """Stride-1 unpadded conv3d as one accumulating matmul per kernel tap.

    Row r of the flattened input is position (t, h, w); tap (dt, dh, dw) reads row
    r + (dt*Hp + dh)*Wp + dw, a contiguous range, so no unfolded copy is made. Outputs are
    computed on the padded (h, w) grid and cropped.
    """
    b, tp, hp, wp, c = x.shape
    o, kt, kh, kw, _ = weight.shape
    t, h, w = tp - kt + 1, hp - kh + 1, wp - kw + 1
    span = (kh - 1) * wp + (kw - 1)
    n = t * hp * wp - span  # rows whose taps all stay inside this sample
    outs = []
    for i in range(b):
        flat = x[i].reshape(-1, c)
        acc = None
        for dt in range(kt):
            for dh in range(kh):
                for dw in range(kw):
                    off = (dt * hp + dh) * wp + dw
                    wt = weight[:, dt, dh, dw].T
                    xs = flat[off : off + n]
                    acc = xs @ wt if acc is None else mx.addmm(acc, xs, wt)
        acc = mx.pad(acc, [(0, span), (0, 0)]).reshape(t, hp, wp, o)
        outs.append(acc[:, :h, :w])
    return mx.stack(outs)


def _conv(x: mx.array, weight: mx.array, stride: int | tuple = 1) -> mx.array:
    """Unpadded mx.conv2d / conv3d (by x.ndim) that never unfolds a large input.

    MLX's CPU convolutions unfold their input (27x for a 3x3x3 kernel: ~25 GB on the last
    decoder level at 480x832), so big stride-1 convs go through `_conv_taps` instead.
    """
    k = weight.shape[1:-1]
    st = (stride,) * len(k) if isinstance(stride, int) else tuple(stride)
    out = [(n - kk) // ss + 1 for n, kk, ss in zip(x.shape[1:-1], k, st, strict=True)]
    positions = x.shape[0] * int(np.prod(out))
    unfold = positions * int(np.prod(weight.shape[1:])) * x.dtype.size
    # Unfolding is fine while it is small, or no bigger than the input and output themselves
    # (e.g. a 3-channel input conv).
    in_out = x.size * x.dtype.size + positions * weight.shape[0] * x.dtype.size
    if unfold <= max(_CONV_UNFOLD_BUDGET, 2 * in_out) or any(s != 1 for s in st):
        return (mx.conv3d if x.ndim == 5 else mx.conv2d)(x, weight, st)
    if x.ndim == 4:  # conv2d: frames as a time axis with a kernel of 1
        return _conv_taps(x[None], weight[:, None])[0]
    return _conv_taps(x, weight)


def _pointwise(x: mx.array, weight: mx.array, bias: mx.array) -> mx.array:
    """A 1x1(x1) conv as a matmul over the last axis (weight [O, 1.., I])."""
    w = weight.reshape(weight.shape[0], -1)
    return mx.addmm(bias, x.reshape(-1, x.shape[-1]), w.T).reshape(*x.shape[:-1], w.shape[0])


class CausalConv3d(nn.Conv3d):
    """Conv3d, zero 'same' padding in space, causal in time through the feature cache.

    With a temporal kernel kt > 1 the input is preceded by the last kt - 1 frames this conv
    was fed on earlier calls (zeros before the video starts), and those are updated.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel: int | tuple[int, int, int] = 3):
        super().__init__(in_dim, out_dim, kernel)
        kt, kh, kw = self.weight.shape[1:4]
        self.kt, self.ph, self.pw = kt, kh // 2, kw // 2

    def __call__(self, x: mx.array, cache: ConvHistories | None = None) -> mx.array:
        if self.weight.shape[1:4] == (1, 1, 1):
            return _pointwise(x, self.weight, self.bias)
        keep = self.kt - 1
        if keep:
            # x after its history (zeros before the video starts), which is kept for next time.
            history = cache.of(self, keep) if cache is not None else ConvHistory(keep)
            x = history.prepend(x)
            history.update(x)
        if self.ph or self.pw:
            x = mx.pad(x, [(0, 0), (0, 0), (self.ph, self.ph), (self.pw, self.pw), (0, 0)])
        return _conv(x, self.weight) + self.bias


class RMSNorm(nn.Module):
    """Wan's RMS_norm: x / ||x|| * sqrt(C) * gamma over channels, which is an RMS norm."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = mx.ones((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.gamma, 1e-12)


class ResidualBlock(nn.Module):
    """norm -> SiLU -> causal conv, twice, plus a (1x1x1 conv) shortcut."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.act = nn.SiLU()
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3)
        self.norm2 = RMSNorm(out_dim)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3)
        if in_dim != out_dim:
            self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1)

    def __call__(self, x: mx.array, cache: ConvHistories, first: bool = False) -> mx.array:
        h = self.conv_shortcut(x) if "conv_shortcut" in self else x
        x = self.conv1(self.act(self.norm1(x)), cache)
        x = self.conv2(self.act(self.norm2(x)), cache)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the h*w positions of each frame."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        # Wan zero-inits the output projection: a fresh block starts as the identity.
        self.proj.weight = mx.zeros_like(self.proj.weight)
        self.attend = ScaledDotProductAttention()

    def __call__(
        self, x: mx.array, cache: ConvHistories | None = None, first: bool = False
    ) -> mx.array:
        b, t, h, w, c = x.shape
        n, length = b * t, h * w
        qkv = _pointwise(
            self.norm(x).reshape(n, 1, length, c), self.to_qkv.weight, self.to_qkv.bias
        )
        q, k, v = mx.split(qkv, 3, axis=-1)
        # Frames are independent: attend a few at a time so the unfused CPU score matrix
        # stays bounded.
        step = max(1, _ATTN_SCORE_BUDGET // (length * length))
        outs = [
            self.attend(q[i : i + step], k[i : i + step], v[i : i + step], c**-0.5)
            for i in range(0, n, step)
        ]
        o = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)
        o = _pointwise(o, self.proj.weight, self.proj.bias)
        return x + o.reshape(b, t, h, w, c)


class _Fixed(nn.Module):
    """Parameter-free placeholder, so conv weights keep the diffusers index (`resample.1`)."""


def _frames_apply(x: mx.array, fn) -> mx.array:
    """Apply a per-frame [N, H, W, C] function to [B, T, H, W, C]."""
    b, t = x.shape[:2]
    y = fn(x.reshape(b * t, *x.shape[2:]))
    return y.reshape(b, t, *y.shape[1:])


def _upsample_nearest2x(x: mx.array) -> mx.array:
    # 'nearest-exact' at an integer factor of 2 is plain pixel duplication.
    n, h, w, c = x.shape
    x = mx.broadcast_to(x[:, :, None, :, None, :], (n, h, 2, w, 2, c))
    return x.reshape(n, 2 * h, 2 * w, c)


class Resample(nn.Module):
    """2x spatial (and optionally temporal) down- or upsampling."""

    def __init__(self, dim: int, mode: str, out_dim: int | None = None):
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = [_Fixed(), nn.Conv2d(dim, out_dim or dim // 2, 3, padding=1)]
            if mode == "upsample3d":
                # Makes 2 frames of each input frame (channel halves), causally.
                self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1))
        elif mode.startswith("downsample"):
            self.resample = [_Fixed(), nn.Conv2d(dim, dim, 3, stride=2)]
            if mode == "downsample3d":
                self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")

    def _spatial(self, x: mx.array) -> mx.array:
        conv = self.resample[1]
        if self.mode.startswith("upsample"):
            pads = [(0, 0), (1, 1), (1, 1), (0, 0)]
            return _frames_apply(
                x, lambda f: _conv(mx.pad(_upsample_nearest2x(f), pads), conv.weight) + conv.bias
            )
        # Zero pad right and bottom by one, then a stride-2 3x3 conv.
        pads = [(0, 0), (0, 1), (0, 1), (0, 0)]
        return _frames_apply(x, lambda f: _conv(mx.pad(f, pads), conv.weight, 2) + conv.bias)

    def _time_up(self, x: mx.array, cache: ConvHistories) -> mx.array:
        b, t, h, w, c = x.shape
        y = self.time_conv(x, cache).reshape(b, t, h, w, 2, c)
        return y.transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)

    def __call__(self, x: mx.array, cache: ConvHistories, first: bool = False) -> mx.array:
        if self.mode.startswith("upsample"):
            if self.mode == "upsample3d":
                if not first:
                    x = self._time_up(x, cache)
                elif x.shape[1] > 1:
                    # The video's first frame is not doubled in time (Wan skips the conv for
                    # it and starts the conv's history from zeros after it).
                    x = mx.concatenate([x[:, :1], self._time_up(x[:, 1:], cache)], axis=1)
            return self._spatial(x)

        x = self._spatial(x)
        if self.mode == "downsample3d":
            tc, history = self.time_conv, cache.of(self, 1)
            if first:
                # The first frame passes; later frames pair up with stride 2 over
                # [previous frame, f0, f1, ...], which a chunked run reproduces exactly.
                y = x[:, :1]
                if x.shape[1] > 1:
                    y = mx.concatenate([y, _conv(x, tc.weight, (2, 1, 1)) + tc.bias], axis=1)
            else:
                y = _conv(history.prepend(x), tc.weight, (2, 1, 1)) + tc.bias
            history.update(x)
            x = y
        return x


def _avg_down(x: mx.array, out_dim: int, ft: int, fs: int) -> mx.array:
    """Wan 2.2's parameter-free shortcut: space/time-to-depth, then mean over channel groups."""
    b, t, h, w, c = x.shape
    pad = (ft - t % ft) % ft  # front zero frames (the first frame alone pairs with a zero)
    if pad:
        x = mx.concatenate([mx.zeros((b, pad, h, w, c), dtype=x.dtype), x], axis=1)
        t += pad
    x = x.reshape(b, t // ft, ft, h // fs, fs, w // fs, fs, c)
    # Channel order of the reference: (c, ft, fs_h, fs_w).
    x = x.transpose(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, t // ft, h // fs, w // fs, -1)
    return x.reshape(*x.shape[:-1], out_dim, -1).mean(axis=-1)


def _dup_up(x: mx.array, out_dim: int, ft: int, fs: int, first: bool) -> mx.array:
    """Wan 2.2's parameter-free shortcut: repeat channels, then depth-to-space/time."""
    b, t, h, w, c = x.shape
    repeats = out_dim * ft * fs * fs // c
    x = mx.repeat(x, repeats, axis=-1).reshape(b, t, h, w, out_dim, ft, fs, fs)
    x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, t * ft, h * fs, w * fs, out_dim)
    return x[:, ft - 1 :] if first else x


class MidBlock(nn.Module):
    """Residual, attention, residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.resnets = [ResidualBlock(dim, dim), ResidualBlock(dim, dim)]
        self.attentions = [AttentionBlock(dim)]

    def __call__(self, x: mx.array, cache: ConvHistories, first: bool = False) -> mx.array:
        x = self.resnets[0](x, cache)
        return self.resnets[1](self.attentions[0](x), cache)


class ResidualDownBlock(nn.Module):
    """Wan 2.2 encoder level: residual blocks + downsample, plus an averaging shortcut."""

    def __init__(self, in_dim: int, out_dim: int, n: int, temporal: bool, down: bool):
        super().__init__()
        self.out_dim = out_dim
        self.ft, self.fs = (2 if temporal else 1), (2 if down else 1)
        self.resnets = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(n)]
        if down:
            self.downsampler = Resample(out_dim, "downsample3d" if temporal else "downsample2d")

    def __call__(self, x: mx.array, cache: ConvHistories, first: bool = False) -> mx.array:
        skip = _avg_down(x, self.out_dim, self.ft, self.fs)
        for resnet in self.resnets:
            x = resnet(x, cache)
        if "downsampler" in self:
            x = self.downsampler(x, cache, first)
        return x + skip


class UpBlock(nn.Module):
    """Wan 2.1 decoder level: residual blocks and an upsample (halving the width)."""

    def __init__(self, in_dim: int, out_dim: int, n: int, mode: str | None):
        super().__init__()
        self.resnets = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(n)]
        if mode is not None:
            self.upsamplers = [Resample(out_dim, mode)]

    def __call__(self, x: mx.array, cache: ConvHistories, first: bool = False) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x, cache)
        if "upsamplers" in self:
            x = self.upsamplers[0](x, cache, first)
        return x


class ResidualUpBlock(nn.Module):
    """Wan 2.2 decoder level: residual blocks + upsample, plus a repeating shortcut."""

    def __init__(self, in_dim: int, out_dim: int, n: int, temporal: bool, up: bool):
        super().__init__()
        self.out_dim, self.ft = out_dim, (2 if temporal else 1)
        self.resnets = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(n)]
        if up:
            mode = "upsample3d" if temporal else "upsample2d"
            self.upsampler = Resample(out_dim, mode, out_dim=out_dim)

    def __call__(self, x: mx.array, cache: ConvHistories, first: bool = False) -> mx.array:
        if "upsampler" not in self:
            for resnet in self.resnets:
                x = resnet(x, cache)
            return x
        skip = _dup_up(x, self.out_dim, self.ft, 2, first)
        for resnet in self.resnets:
            x = resnet(x, cache)
        return self.upsampler(x, cache, first) + skip


class Encoder(nn.Module):
    """Pixels (patchified) -> 2 * z_dim channels (mean, log-variance), causal in time."""

    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in [1, *cfg.dim_mult]]
        td = cfg.temporal_down
        self.conv_in = CausalConv3d(cfg.io_channels, dims[0], 3)
        blocks: list[nn.Module] = []
        for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            down = i != cfg.levels - 1
            if cfg.version == "2.2":
                blocks.append(
                    ResidualDownBlock(din, dout, cfg.num_res_blocks, down and td[i], down)
                )
                continue
            # 2.1: one flat list (resnets, then a resample), as in both references.
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(din, dout))
                din = dout
            if down:
                blocks.append(Resample(dout, "downsample3d" if td[i] else "downsample2d"))
        self.down_blocks = blocks
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1])
        self.act = nn.SiLU()
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, 3)

    def __call__(self, x: mx.array, cache: ConvHistories, first: bool) -> mx.array:
        x = self.conv_in(x, cache)
        for block in self.down_blocks:
            x = block(x, cache, first)
        x = self.mid_block(x, cache)
        return self.conv_out(self.act(self.norm_out(x)), cache)


class Decoder(nn.Module):
    """z_dim channels -> pixels (patchified), causal in time."""

    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        dims = [cfg.dec_dim * m for m in [cfg.dim_mult[-1], *cfg.dim_mult[::-1]]]
        tu = cfg.temporal_down[::-1]
        n = cfg.num_res_blocks + 1
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3)
        self.mid_block = MidBlock(dims[0])
        blocks: list[nn.Module] = []
        for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            up = i != cfg.levels - 1
            if cfg.version == "2.2":
                blocks.append(ResidualUpBlock(din, dout, n, up and tu[i], up))
                continue
            if i > 0:
                din //= 2  # the previous level's upsample conv halved the width
            mode = ("upsample3d" if tu[i] else "upsample2d") if up else None
            blocks.append(UpBlock(din, dout, n, mode))
        self.up_blocks = blocks
        self.norm_out = RMSNorm(dims[-1])
        self.act = nn.SiLU()
        self.conv_out = CausalConv3d(dims[-1], cfg.io_channels, 3)

    def __call__(self, x: mx.array, cache: ConvHistories, first: bool) -> mx.array:
        x = self.conv_in(x, cache)
        x = self.mid_block(x, cache)
        for block in self.up_blocks:
            x = block(x, cache, first)
        return self.conv_out(self.act(self.norm_out(x)), cache)


# ----------------------------------------------------------------------------------------------
# Spatial tiling


def _tile_starts(n: int, tile: int, stride: int) -> list[int]:
    """Starts of tiles of size `tile` covering [0, n); the last one is moved flush to the end."""
    if n <= tile:
        return [0]
    return list(range(0, n - tile, stride)) + [n - tile]


def _ramp(size: int, ramp: int, lead: bool, trail: bool) -> np.ndarray:
    """1 inside, rising linearly over `ramp` samples at edges that meet a neighbour tile."""
    w = np.ones(size, dtype=np.float64)
    r = min(ramp, size)
    if r > 0:
        up = (np.arange(r) + 1.0) / (r + 1.0)
        if lead:
            w[:r] = np.minimum(w[:r], up)
        if trail:
            w[size - r :] = np.minimum(w[size - r :], up[::-1])
    return w


@dataclass
class _Tiling:
    """Overlapping spatial tiles of an input grid and their blend weights on the output grid."""

    tiles: list[tuple[int, int, int, int]]  # input y0, x0, h, w
    weights: list[mx.array]  # per tile [1, 1, h*s, w*s, 1], summing to 1 over the output
    scale: float  # output size / input size

    @classmethod
    def plan(cls, h: int, w: int, tile: int, stride: int, scale: float) -> _Tiling:
        ys, xs = _tile_starts(h, tile, stride), _tile_starts(w, tile, stride)
        th, tw = min(tile, h), min(tile, w)
        ramp = round((tile - stride) * scale)
        oh, ow = round(th * scale), round(tw * scale)
        total = np.zeros((round(h * scale), round(w * scale)))
        raw = []
        for i, y0 in enumerate(ys):
            wy = _ramp(oh, ramp, i > 0, i < len(ys) - 1)
            for j, x0 in enumerate(xs):
                wx = _ramp(ow, ramp, j > 0, j < len(xs) - 1)
                wt = np.outer(wy, wx)
                oy, ox = round(y0 * scale), round(x0 * scale)
                total[oy : oy + oh, ox : ox + ow] += wt
                raw.append(((y0, x0, th, tw), (oy, ox), wt))
        tiles, weights = [], []
        for t, (oy, ox), wt in raw:
            tiles.append(t)
            norm = wt / total[oy : oy + oh, ox : ox + ow]
            weights.append(mx.array(norm[None, None, :, :, None].astype(np.float32)))
        return cls(tiles, weights, scale)

    def run(
        self, x: mx.array, net: nn.Module, caches: list[ConvHistories], first: bool
    ) -> mx.array:
        """Run net(tile, cache, first) on every tile of x [B, T, H, W, C]; blend the outputs.

        Each tile is evaluated before the next starts (MLX's CPU backend allocates a whole
        graph's buffers up front), so peak memory is one tile's; not for differentiation.
        """
        out = None
        for k, (y0, x0, th, tw) in enumerate(self.tiles):
            y = net(x[:, :, y0 : y0 + th, x0 : x0 + tw], caches[k], first)
            if out is None:
                b, t, _, _, c = y.shape
                h, w = round(x.shape[2] * self.scale), round(x.shape[3] * self.scale)
                out = mx.zeros((b, t, h, w, c), dtype=y.dtype)
            oy, ox = round(y0 * self.scale), round(x0 * self.scale)
            out[:, :, oy : oy + y.shape[2], ox : ox + y.shape[3]] += y * self.weights[k]
            mx.eval(out, caches[k].arrays())
        return out


# ----------------------------------------------------------------------------------------------
# The VAE


class WanStreamingDecoder(StreamingDecoder):
    """The Wan VAE's streaming decode, `frames_per_pass` latent frames per decoder pass.

    The first latent frame it ever sees gives 1 pixel frame, each later one gives 4.
    """

    def __init__(self, vae: WanVAE, frames_per_pass: int = 1):
        self.frames_per_pass = frames_per_pass
        super().__init__(vae)

    def reset(self) -> None:
        """Forget the past: the next chunk starts a new video."""
        super().reset()
        self.tiling: _Tiling | None = None
        self.tile_histories: list[ConvHistories] | None = None

    def decode_step(self, z: mx.array, first: bool) -> mx.array:
        vae = self.vae
        if self.tile_histories is None:
            self.tiling = vae._decode_tiling(z.shape[2], z.shape[3])
            tiles = self.tiling.tiles if self.tiling else []
            self.tile_histories = [ConvHistories() for _ in tiles] or [self.histories]
        x = vae.post_quant_conv(vae.denormalize(z).astype(vae.dtype))
        outs = []
        for i in range(0, z.shape[1], self.frames_per_pass):
            step = x[:, i : i + self.frames_per_pass]
            starts = first and i == 0
            if self.tiling is None:
                y = vae.decoder_module(step, self.histories, starts)
            else:
                y = self.tiling.run(step, vae.decoder_module, self.tile_histories, starts)
            # Evaluate per pass: keeps the graph (and memory) bounded and the caches concrete.
            mx.eval(y, [h.arrays() for h in self.tile_histories])
            outs.append(y)
        return vae.unpatchify(mx.concatenate(outs, axis=1) if len(outs) > 1 else outs[0])


# Convs that read SiLU(RMSNorm(x)); every other conv reads the linear residual stream.
_AFTER_SILU = ("conv1", "conv2", "conv_out")


def _init_for_training(model: nn.Module) -> None:
    """Variance-preserving conv init: weights N(0, gain / fan_in), zero biases.

    Gain 2 (He) for convs after a SiLU, 1 for convs on the residual stream (resamplers,
    shortcuts, time convs, conv_in, quant convs, attention qkv). The default (PyTorch's and
    MLX's) U(+-1/sqrt(fan_in)) has gain 1/3: every resample / shortcut conv shrinks the stream
    while each residual branch adds an O(1), mostly input-independent term (RMSNorm does not
    centre, SiLU's output has a positive mean), so at a small width the input signal fades to
    ~1% of the activations by the bottleneck and the decoder output, and training falls into
    predicting the mean clip (posterior collapse; diffusers' AutoencoderKLWan does the same).
    Loaded weights replace all of this; the attention proj keeps Wan's zero init.
    """
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if not isinstance(module, (nn.Conv2d, nn.Conv3d)) or leaf == "proj":
            continue
        w = module.weight
        module.bias = mx.zeros_like(module.bias)
        if leaf == "conv2":  # each residual branch starts as zero: blocks start as identity
            module.weight = mx.zeros_like(w)
            continue
        gain = 2.0 if leaf in _AFTER_SILU else 1.0
        std = (gain / int(np.prod(w.shape[1:]))) ** 0.5  # MLX layout: fan_in = all but axis 0
        module.weight = std * mx.random.normal(w.shape, dtype=w.dtype)


class WanVAE(LatentSpace, nn.Module):
    """The Wan 2.1 / 2.2 VAE with the pipeline's VAE interface."""

    NAME = "Wan VAE"

    def __init__(self, config: WanVAEConfig):
        super().__init__()
        config.validate()
        self.config = config
        z = config.z_dim
        self.encoder = Encoder(config)
        self.quant_conv = CausalConv3d(2 * z, 2 * z, 1)
        self.post_quant_conv = CausalConv3d(z, z, 1)
        self.decoder_module = Decoder(config)
        self.init_latent_space()
        self._tile: tuple[int, int] | None = None  # (tile, stride) in pixels when tiling
        _init_for_training(self)

    # -- interface properties (the rest come with LatentSpace) ------------------------------

    @property
    def dtype(self) -> mx.Dtype:
        return self.post_quant_conv.weight.dtype

    # -- patchify (2.2) ----------------------------------------------------------------------

    def patchify(self, video: mx.array) -> mx.array:
        """[B, F, H, W, 3] -> [B, F, H/p, W/p, 3*p*p], channels ordered (c, w, h) as Wan does."""
        p = self.config.patch_size
        if p == 1:
            return video
        b, f, hh, ww, c = video.shape
        x = video.reshape(b, f, hh // p, p, ww // p, p, c)
        return x.transpose(0, 1, 2, 4, 6, 5, 3).reshape(b, f, hh // p, ww // p, c * p * p)

    def unpatchify(self, x: mx.array) -> mx.array:
        """Inverse of patchify."""
        p = self.config.patch_size
        if p == 1:
            return x
        b, f, h, w, _ = x.shape
        x = x.reshape(b, f, h, w, 3, p, p)  # (c, w-offset, h-offset)
        return x.transpose(0, 1, 2, 6, 3, 5, 4).reshape(b, f, h * p, w * p, 3)

    # -- tiling --------------------------------------------------------------------------------

    def enable_tiling(self, tile_size: int = 256, tile_stride: int = 192) -> None:
        """Encode/decode frames larger than tile_size pixels in overlapping, blended tiles.

        Lowers peak memory for large frames; results differ slightly from untiled near seams.
        Both sizes are in pixels and must be multiples of spatial_factor.
        """
        sf = self.spatial_factor
        if tile_size % sf or tile_stride % sf or not 0 < tile_stride <= tile_size:
            raise S2DiTError(
                f"Wan VAE tiling: tile size and stride must be multiples of {sf} with "
                f"0 < stride <= size, got {tile_size} and {tile_stride}"
            )
        self._tile = (tile_size, tile_stride)

    def disable_tiling(self) -> None:
        """Encode/decode whole frames (the default)."""
        self._tile = None

    def _decode_tiling(self, h: int, w: int) -> _Tiling | None:
        if self._tile is None:
            return None
        sf, p = self.spatial_factor, self.config.patch_size
        tile, stride = self._tile[0] // sf, self._tile[1] // sf
        if h <= tile and w <= tile:
            return None
        return _Tiling.plan(h, w, tile, stride, sf // p)

    def _encode_tiling(self, hh: int, ww: int) -> _Tiling | None:
        # Works on the patchified grid (pixels / patch_size).
        if self._tile is None:
            return None
        sf, p = self.spatial_factor, self.config.patch_size
        tile, stride = self._tile[0] // p, self._tile[1] // p
        if hh <= tile and ww <= tile:
            return None
        return _Tiling.plan(hh, ww, tile, stride, p / sf)

    # -- encode / decode ---------------------------------------------------------------------

    def _check_video(self, video: mx.array) -> None:
        tf, sf = self.temporal_factor, self.spatial_factor
        if video.ndim != 5 or video.shape[-1] != 3:
            raise S2DiTError(f"Wan VAE: video must be [B, F, H, W, 3], got {tuple(video.shape)}")
        _, f, hh, ww, _ = video.shape
        if f < 1 or (f - 1) % tf:
            raise S2DiTError(f"Wan VAE: frame count must be 1 + {tf}k, got {f}")
        if hh % sf or ww % sf:
            raise S2DiTError(f"Wan VAE: height and width must be divisible by {sf}, got {hh}x{ww}")

    def encode_moments(
        self, video: mx.array, frames_per_pass: int | None = 1
    ) -> tuple[mx.array, mx.array]:
        """Video [B, F, H, W, 3] in [-1, 1] -> raw (mean, log-variance), each [B, f, h, w, z].

        frames_per_pass: latent frames per encoder pass after the first frame (Wan: 1, i.e.
        4 pixel frames); None runs the whole video in one differentiable pass (training).
        """
        self._check_video(video)
        x = self.patchify(video.astype(self.dtype))
        f = x.shape[1]
        if frames_per_pass is None:
            spans = [(0, f)]
        else:
            step = self.temporal_factor * max(1, int(frames_per_pass))
            spans = [(0, 1)] + [(a, min(a + step, f)) for a in range(1, f, step)]
        tiling = self._encode_tiling(x.shape[2], x.shape[3])
        caches = [ConvHistories() for _ in (tiling.tiles if tiling else [0])]
        outs = []
        for a, b in spans:
            first = a == 0
            if tiling is None:
                y = self.encoder(x[:, a:b], caches[0], first)
            else:
                y = tiling.run(x[:, a:b], self.encoder, caches, first)
            if frames_per_pass is not None:
                mx.eval(y, [cache.arrays() for cache in caches])
            outs.append(y)
        h = mx.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
        h = self.quant_conv(h)
        mu, logvar = mx.split(h, 2, axis=-1)
        return mu, mx.clip(logvar, -30.0, 20.0)

    def encode(self, video: mx.array, frames_per_pass: int | None = 1) -> mx.array:
        """Encode video [B, F, H, W, 3] in [-1, 1] (F = 1 + 4k) -> normalised latents (means)."""
        mu, _ = self.encode_moments(video, frames_per_pass)
        return self.normalize(mu)

    def decoder(self, frames_per_pass: int = 1) -> WanStreamingDecoder:
        """A fresh streaming decoder (its own causal caches); Wan decodes 1 latent frame/pass."""
        return WanStreamingDecoder(self, frames_per_pass)

    def decode(self, z: mx.array, frames_per_pass: int = 1, clip: bool = True) -> mx.array:
        """Decode a whole normalised latent sequence -> frames [B, 1+4(f-1), H, W, 3]."""
        return self.decoder(frames_per_pass).decode(z, clip=clip)

    def decode_full(self, z: mx.array) -> mx.array:
        """One differentiable pass over all latent frames (training); unclipped frames."""
        self.check_latents(z)
        x = self.post_quant_conv(self.denormalize(z).astype(self.dtype))
        return self.unpatchify(self.decoder_module(x, ConvHistories(), True))

    def __call__(self, video: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Reconstruct video (training): returns (frames, mean, log-variance), one pass each."""
        mu, logvar = self.encode_moments(video, frames_per_pass=None)
        return self.decode_full(self.normalize(mu)), mu, logvar

    # -- weights -------------------------------------------------------------------------------

    def sanitize(self, weights: dict) -> dict:
        """Map diffusers / original Wan / our names and PyTorch layouts onto ours."""
        keys = list(weights)
        if any(k.startswith(("encoder.downsamples.", "encoder.conv1.", "conv1.")) for k in keys):
            weights = {_wan_original_to_ours(k, self.config): v for k, v in weights.items()}
        weights = {
            ("decoder_module." + k[len("decoder.") :] if k.startswith("decoder.") else k): v
            for k, v in weights.items()
        }
        # PyTorch layout iff norm gains are [C, 1, 1(, 1)]; our saved files keep them [C].
        if not any(k.endswith(".gamma") and v.ndim > 1 for k, v in weights.items()):
            return weights
        out = {}
        for k, v in weights.items():
            if k.endswith(".gamma"):
                v = v.reshape(-1)
            elif v.ndim == 5:  # Conv3d O,I,D,H,W -> O,D,H,W,I
                v = v.transpose(0, 2, 3, 4, 1)
            elif v.ndim == 4:  # Conv2d O,I,H,W -> O,H,W,I
                v = v.transpose(0, 2, 3, 1)
            out[k] = v
        return out


# ----------------------------------------------------------------------------------------------
# Original Wan names -> ours

_RESIDUAL_LEAVES = [
    (".residual.0.", ".norm1."),
    (".residual.2.", ".conv1."),
    (".residual.3.", ".norm2."),
    (".residual.6.", ".conv2."),
    (".shortcut.", ".conv_shortcut."),
]
_FIXED_PREFIXES = [
    ("conv1.", "quant_conv."),
    ("conv2.", "post_quant_conv."),
    ("encoder.conv1.", "encoder.conv_in."),
    ("decoder.conv1.", "decoder.conv_in."),
    ("encoder.head.0.", "encoder.norm_out."),
    ("encoder.head.2.", "encoder.conv_out."),
    ("decoder.head.0.", "decoder.norm_out."),
    ("decoder.head.2.", "decoder.conv_out."),
    ("encoder.middle.0.", "encoder.mid_block.resnets.0."),
    ("encoder.middle.1.", "encoder.mid_block.attentions.0."),
    ("encoder.middle.2.", "encoder.mid_block.resnets.1."),
    ("decoder.middle.0.", "decoder.mid_block.resnets.0."),
    ("decoder.middle.1.", "decoder.mid_block.attentions.0."),
    ("decoder.middle.2.", "decoder.mid_block.resnets.1."),
]


def _wan21_decoder_index(cfg: WanVAEConfig) -> dict[int, str]:
    """Flat `decoder.upsamples.N` (2.1) -> `up_blocks.i.resnets.j` / `up_blocks.i.upsamplers.0`."""
    table, n = {}, 0
    for i in range(cfg.levels):
        for j in range(cfg.num_res_blocks + 1):
            table[n] = f"up_blocks.{i}.resnets.{j}"
            n += 1
        if i != cfg.levels - 1:
            table[n] = f"up_blocks.{i}.upsamplers.0"
            n += 1
    return table


def _wan_original_to_ours(key: str, cfg: WanVAEConfig) -> str:
    """One original-Wan state-dict key -> its diffusers-style name (decoder still `decoder.`)."""
    for old, new in _FIXED_PREFIXES:
        if key.startswith(old):
            key = new + key[len(old) :]
            break
    else:
        nrb = cfg.num_res_blocks
        m = re.match(r"encoder\.downsamples\.(\d+)\.downsamples\.(\d+)\.(.*)", key)
        if m:  # 2.2
            i, j, rest = int(m[1]), int(m[2]), m[3]
            sub = f"resnets.{j}" if j < nrb else "downsampler"
            key = f"encoder.down_blocks.{i}.{sub}.{rest}"
        elif key.startswith("encoder.downsamples."):  # 2.1: same flat order as diffusers
            key = "encoder.down_blocks." + key[len("encoder.downsamples.") :]
        else:
            m = re.match(r"decoder\.upsamples\.(\d+)\.upsamples\.(\d+)\.(.*)", key)
            if m:  # 2.2
                i, j, rest = int(m[1]), int(m[2]), m[3]
                sub = f"resnets.{j}" if j <= nrb else "upsampler"
                key = f"decoder.up_blocks.{i}.{sub}.{rest}"
            else:
                m = re.match(r"decoder\.upsamples\.(\d+)\.(.*)", key)
                if m:  # 2.1
                    table = _wan21_decoder_index(cfg)
                    n = int(m[1])
                    key = f"decoder.{table.get(n, f'upsamples.{n}')}.{m[2]}"
    for old, new in _RESIDUAL_LEAVES:
        key = key.replace(old, new)
    return key


__all__ = [
    "WAN21_LATENTS_MEAN",
    "WAN21_LATENTS_STD",
    "WAN22_LATENTS_MEAN",
    "WAN22_LATENTS_STD",
    "WanStreamingDecoder",
    "WanVAE",
    "WanVAEConfig",
]
