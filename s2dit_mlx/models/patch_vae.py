"""A small causal video VAE: linear patch (de)compression plus a causal 3D conv.

It stands in for the Wan VAE wherever a real, cheap VAE is enough (tests, tiny
models, the CLI fixture) and follows the same VAE interface the pipeline uses:

- pixel frames 1 + 4k <-> latent frames 1 + k: the first latent frame covers the
  first pixel frame alone, each later latent frame covers the next 4 frames;
- space is compressed by 8 in height and width;
- decoding is causal in time and can be streamed chunk by chunk with
  `vae.decoder()`, giving exactly the frames of a one-shot decode.

Layout per latent frame t (channels-last, [B, T, h, w, C]):
    encode: patch of (4 frames x 8 x 8 x 3) -> Linear -> SiLU -> [MLP blocks] -> causal Conv3d -> z
    decode: z -> causal Conv3d -> SiLU -> [MLP blocks] -> Linear -> patch of (4 frames x 8 x 8 x 3)
where each of the `mlp_blocks` optional blocks is h + Linear(SiLU(Linear(h))) per position.
The first latent frame's pixel group is its one frame repeated 4 times (encode) and
the last of the 4 decoded frames (decode), so one set of weights serves both cases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import mlx.core as mx
import mlx.nn as nn

from ..cache import ConvHistories, ConvHistory
from ..config import ConfigBase
from ..errors import S2DiTError
from ..validate import check_field_types
from .interfaces import LatentSpace, StreamingDecoder


@dataclass
class PatchVAEConfig(ConfigBase):
    """Config of the patch VAE (the `vae` entry of a model folder, type "patch")."""

    config_name: ClassVar[str] = "patch VAE config"

    type: str = "patch"
    z_dim: int = 16
    temporal_factor: int = 4
    spatial_factor: int = 8
    hidden_dim: int = 64
    # Causal conv kernel in latent frames (time) and pixels of the latent grid (space).
    temporal_kernel: int = 2
    spatial_kernel: int = 3
    # Residual per-position MLP blocks on each side (0: a single hidden layer, as in v1 folders).
    mlp_blocks: int = 0
    # Latents are stored normalised: z_norm = (z - mean) / std, per channel (as Wan does).
    latents_mean: list[float] = field(default_factory=list)
    latents_std: list[float] = field(default_factory=list)

    def validate(self) -> None:
        """Raise S2DiTError on an inconsistent config."""
        check_field_types(self, "patch VAE config")
        if self.type != "patch":
            raise S2DiTError(f"patch VAE config has type {self.type!r}, expected 'patch'")
        for name in ("z_dim", "temporal_factor", "spatial_factor", "hidden_dim", "temporal_kernel"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise S2DiTError(
                    f"patch VAE config: {name} must be a positive integer, got {value!r}"
                )
        if not isinstance(self.mlp_blocks, int) or self.mlp_blocks < 0:
            raise S2DiTError(
                f"patch VAE config: mlp_blocks must be a non-negative integer, got {self.mlp_blocks!r}"
            )
        if self.spatial_kernel < 1 or self.spatial_kernel % 2 == 0:
            raise S2DiTError(
                f"patch VAE config: spatial_kernel must be odd, got {self.spatial_kernel!r}"
            )
        for name in ("latents_mean", "latents_std"):
            value = getattr(self, name)
            if value and len(value) != self.z_dim:
                raise S2DiTError(
                    f"patch VAE config: {name} has {len(value)} entries, expected z_dim={self.z_dim}"
                )
        if any(s <= 0 for s in self.latents_std):
            raise S2DiTError("patch VAE config: latents_std entries must be > 0")


class CausalConv3d(nn.Module):
    """Conv3d with zero 'same' padding in space and causal padding in time."""

    def __init__(self, in_dim: int, out_dim: int, kt: int, ks: int):
        super().__init__()
        self.kt, self.ks = kt, ks
        self.conv = nn.Conv3d(in_dim, out_dim, (kt, ks, ks))

    def __call__(self, x: mx.array, history: ConvHistory | None = None) -> mx.array:
        """Convolve x [B, T, h, w, C] after the previous kt - 1 input frames (`history`, updated;
        None: zeros before the first frame)."""
        history = history if history is not None else ConvHistory(self.kt - 1)
        x = history.prepend(x)
        history.update(x)
        p = self.ks // 2
        return self.conv(mx.pad(x, [(0, 0), (0, 0), (p, p), (p, p), (0, 0)]))


class MLPBlock(nn.Module):
    """h + fc2(SiLU(fc1(h))) at every latent position; fc2 starts at zero (an identity block)."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(dim, dim)
        self.fc2.weight = mx.zeros_like(self.fc2.weight)
        self.fc2.bias = mx.zeros_like(self.fc2.bias)

    def __call__(self, h: mx.array) -> mx.array:
        return h + self.fc2(self.act(self.fc1(h)))


class Encoder(nn.Module):
    """Pixel patches -> latents, causal in time."""

    def __init__(self, cfg: PatchVAEConfig):
        super().__init__()
        patch = cfg.temporal_factor * cfg.spatial_factor**2 * 3
        self.patch_in = nn.Linear(patch, cfg.hidden_dim)
        self.act = nn.SiLU()
        self.blocks = [MLPBlock(cfg.hidden_dim) for _ in range(cfg.mlp_blocks)]
        self.conv = CausalConv3d(cfg.hidden_dim, cfg.z_dim, cfg.temporal_kernel, cfg.spatial_kernel)

    def __call__(self, patches: mx.array) -> mx.array:
        h = self.act(self.patch_in(patches))
        for block in self.blocks:
            h = block(h)
        return self.conv(h)


class Decoder(nn.Module):
    """Latents -> pixel patches, causal in time."""

    def __init__(self, cfg: PatchVAEConfig):
        super().__init__()
        patch = cfg.temporal_factor * cfg.spatial_factor**2 * 3
        self.conv = CausalConv3d(cfg.z_dim, cfg.hidden_dim, cfg.temporal_kernel, cfg.spatial_kernel)
        self.act = nn.SiLU()
        self.blocks = [MLPBlock(cfg.hidden_dim) for _ in range(cfg.mlp_blocks)]
        self.patch_out = nn.Linear(cfg.hidden_dim, patch)

    def __call__(self, z: mx.array, histories: ConvHistories | None = None) -> mx.array:
        history = histories.of(self.conv, self.conv.kt - 1) if histories is not None else None
        h = self.act(self.conv(z, history))
        for block in self.blocks:
            h = block(h)
        return self.patch_out(h)


class PatchStreamingDecoder(StreamingDecoder):
    """The patch VAE's streaming decode: one latent frame at a time.

    Every frame is computed by the same ops on the same shapes however the sequence is
    chunked, so a streamed decode is bit-identical to a one-shot decode.
    """

    def decode_step(self, z: mx.array, first: bool) -> mx.array:
        vae = self.vae
        z = vae.denormalize(z)
        outs = [vae.decoder_module(z[:, i : i + 1], self.histories) for i in range(z.shape[1])]
        frames = vae.unpatchify(mx.concatenate(outs, axis=1))
        # Group 0 stands for the first pixel frame only: keep its last decoded frame.
        return frames[:, vae.temporal_factor - 1 :] if first else frames


class PatchVAE(LatentSpace, nn.Module):
    """Small causal video VAE with the pipeline's VAE interface."""

    NAME = "patch VAE"

    def __init__(self, config: PatchVAEConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder_module = Decoder(config)
        self.init_latent_space()

    def patchify(self, video: mx.array) -> mx.array:
        """[B, F=1+4k, H, W, 3] -> [B, 1+k, H/8, W/8, 4*8*8*3] (first frame repeated 4x)."""
        tf, sf = self.temporal_factor, self.spatial_factor
        first = mx.repeat(video[:, :1], tf, axis=1)
        video = mx.concatenate([first, video[:, 1:]], axis=1)
        b, f, hh, ww, c = video.shape
        t, h, w = f // tf, hh // sf, ww // sf
        x = video.reshape(b, t, tf, h, sf, w, sf, c)
        x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
        return x.reshape(b, t, h, w, tf * sf * sf * c)

    def unpatchify(self, patches: mx.array) -> mx.array:
        """[B, T, h, w, 4*8*8*3] -> [B, 4T, 8h, 8w, 3]."""
        tf, sf = self.temporal_factor, self.spatial_factor
        b, t, h, w, _ = patches.shape
        x = patches.reshape(b, t, h, w, tf, sf, sf, 3)
        x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
        return x.reshape(b, t * tf, h * sf, w * sf, 3)

    def encode(self, video: mx.array) -> mx.array:
        """Encode video [B, F, H, W, 3] in [-1, 1] (F = 1 + 4k) -> normalised latents."""
        tf, sf = self.temporal_factor, self.spatial_factor
        if video.ndim != 5 or video.shape[-1] != 3:
            raise S2DiTError(f"patch VAE: video must be [B, F, H, W, 3], got {tuple(video.shape)}")
        _, f, hh, ww, _ = video.shape
        if f < 1 or (f - 1) % tf:
            raise S2DiTError(f"patch VAE: frame count must be 1 + {tf}k, got {f}")
        if hh % sf or ww % sf:
            raise S2DiTError(
                f"patch VAE: height and width must be divisible by {sf}, got {hh}x{ww}"
            )
        return self.normalize(self.encoder(self.patchify(video)))

    def decoder(self) -> PatchStreamingDecoder:
        """A fresh streaming decoder (its own causal state)."""
        return PatchStreamingDecoder(self)

    def decode(self, z: mx.array) -> mx.array:
        """Decode a whole latent sequence at once -> frames [B, 1+4(f-1), H, W, 3] in [-1, 1]."""
        return self.decoder().decode(z)

    def __call__(self, video: mx.array) -> mx.array:
        """Reconstruct video through encode + decode (for training)."""
        return self.decode(self.encode(video))

    def sanitize(self, weights: dict) -> dict:
        """Weights are stored under their module names: nothing to rename."""
        return weights
