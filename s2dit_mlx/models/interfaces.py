"""What the pipeline, training and export expect of a VAE and a text encoder.

`VideoVAE` and `TextEncoder` are Protocols: any module with these members works (the patch VAE
and the Wan VAE; the byte encoder and umT5). `StreamingDecoder` is the one streaming-decode
loop both VAEs share: each VAE supplies `decode_step`, the decoder keeps the causal state
(cache.ConvHistories) and the bookkeeping.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import mlx.core as mx

from ..cache import ConvHistories
from ..errors import S2DiTError


@runtime_checkable
class VideoVAE(Protocol):
    """A causal video VAE: pixel frames 1 + tf*k <-> latent frames 1 + k, space / spatial_factor."""

    config: object

    @property
    def z_dim(self) -> int: ...

    @property
    def temporal_factor(self) -> int: ...

    @property
    def spatial_factor(self) -> int: ...

    def encode(self, video: mx.array) -> mx.array:
        """Video [B, F, H, W, 3] in [-1, 1] -> normalised latents [B, f, h, w, z_dim]."""
        ...

    def decoder(self) -> StreamingDecoder:
        """A fresh streaming decoder."""
        ...

    def decode(self, z: mx.array) -> mx.array:
        """Normalised latents -> frames [B, F, H, W, 3] in [-1, 1]."""
        ...

    def check_latents(self, z: mx.array) -> None:
        """Raise S2DiTError unless z is [B, f, h, w, z_dim]."""
        ...


class LatentSpace:
    """What both VAEs share about their latents: sizes, frame counts and normalisation.

    A VAE sets `config` (z_dim, temporal_factor, spatial_factor, latents_mean, latents_std) and
    `NAME` (for messages), and calls `init_latent_space()` in its constructor.
    """

    NAME = "VAE"
    config: object

    def init_latent_space(self) -> None:
        """The normalisation constants from the config (underscored: not parameters)."""
        z = self.config.z_dim
        self._mean = mx.array(self.config.latents_mean or [0.0] * z, dtype=mx.float32)
        self._std = mx.array(self.config.latents_std or [1.0] * z, dtype=mx.float32)

    @property
    def z_dim(self) -> int:
        return self.config.z_dim

    @property
    def temporal_factor(self) -> int:
        return self.config.temporal_factor

    @property
    def spatial_factor(self) -> int:
        return self.config.spatial_factor

    def num_latent_frames(self, num_frames: int) -> int:
        """Pixel frames 1 + 4k -> latent frames 1 + k."""
        return 1 + (num_frames - 1) // self.temporal_factor

    def num_pixel_frames(self, num_latent_frames: int) -> int:
        """Latent frames 1 + k -> pixel frames 1 + 4k."""
        return 1 + (num_latent_frames - 1) * self.temporal_factor if num_latent_frames else 0

    def normalize(self, z: mx.array) -> mx.array:
        """Raw latents -> the normalised latents the DiT works on."""
        return ((z - self._mean) / self._std).astype(z.dtype)

    def denormalize(self, z: mx.array) -> mx.array:
        """Normalised latents -> raw decoder input."""
        return (z * self._std + self._mean).astype(z.dtype)

    def check_latents(self, z: mx.array) -> None:
        """Raise S2DiTError unless z is [B, f, h, w, z_dim]."""
        if z.ndim != 5 or z.shape[-1] != self.z_dim:
            raise S2DiTError(
                f"{self.NAME}: latents must be [B, f, h, w, {self.z_dim}], got {tuple(z.shape)}"
            )


@runtime_checkable
class TextEncoder(Protocol):
    """Prompts -> embeddings [B, L, dim] (the DiT pads or trims them to its text_len)."""

    config: object

    @property
    def dim(self) -> int: ...

    def encode(self, prompts: list[str]) -> mx.array:
        """Embeddings of a batch of prompts."""
        ...


class StreamingDecoder:
    """Decodes latent chunks one after another with the VAE's causal state.

    The first latent frame of a video stands for its first pixel frame; a VAE's `decode_step`
    knows what that means for it (`first`). A chunk's frames equal those of a one-shot decode.
    """

    def __init__(self, vae):
        self.vae = vae
        self.reset()

    def reset(self) -> None:
        """Forget the past: the next chunk starts a new video."""
        self.histories = ConvHistories()
        self.shape: tuple[int, int, int] | None = None  # (batch, h, w) of this video
        self.frames_in = 0  # latent frames decoded so far

    def decode(self, z: mx.array, clip: bool = True) -> mx.array:
        """Normalised latents [B, f, h, w, z_dim] -> frames [B, F, H, W, 3] (in [-1, 1] if clip)."""
        self.vae.check_latents(z)
        b, f, h, w, _ = z.shape
        sf = self.vae.spatial_factor
        if f == 0:
            return mx.zeros((b, 0, h * sf, w * sf, 3), dtype=mx.float32)
        if self.shape is None:
            self.shape = (b, h, w)
        elif (b, h, w) != self.shape:
            raise S2DiTError(
                f"streaming decoder: a chunk of batch {b} at {h}x{w} latents follows batch "
                f"{self.shape[0]} at {self.shape[1]}x{self.shape[2]}; call reset() first"
            )
        frames = self.decode_step(z, first=self.frames_in == 0).astype(mx.float32)
        self.frames_in += f
        return mx.clip(frames, -1.0, 1.0) if clip else frames

    def decode_step(self, z: mx.array, first: bool) -> mx.array:
        """The VAE's own decode of one chunk with `self.histories` (subclasses)."""
        raise NotImplementedError
