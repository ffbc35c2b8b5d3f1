"""Drive the MLX model and a saved package through the same streaming loop, and compare them.

Both sides run generation.stream, the library's one streaming loop, with the noise given from
outside (GivenNoise: the Core ML side has no MLX random generator) and the few-step sampler on
the given timesteps: per chunk, start from noise[c][0]; at each t predict x0 = x - t/1000 * v
and re-noise it to the next t with noise[c][i + 1]; then one pass at t=0 over the clean chunk
writes it into the state. A saved package takes part through PackageDiT, which calls its
`denoise` and `write` functions (numpy interpreter) where the MLX model would be called.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..generation import GivenNoise, Sampler, stream

PSNR_GATES = {"fp32": 60.0, "fp16": 50.0, "compressed": 35.0}


def psnr(reference: np.ndarray, test: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB, the peak being max |reference|."""
    ref = np.asarray(reference, np.float64)
    err = np.mean((ref - np.asarray(test, np.float64)) ** 2)
    peak = np.max(np.abs(ref))
    if err == 0:
        return math.inf
    return float(10.0 * math.log10(peak**2 / err))


def make_noise(
    chunks: int, steps: int, shape: tuple[int, ...], seed: int = 0
) -> list[list[np.ndarray]]:
    """noise[c][i]: the starting noise (i = 0) and the re-noising draws of chunk c."""
    rng = np.random.default_rng(seed)
    return [
        [rng.standard_normal(shape).astype(np.float32) for _ in range(steps)] for _ in range(chunks)
    ]


def pad_context(context: np.ndarray, text_len: int) -> np.ndarray:
    """Zero-pad (or trim) text embeddings [1, L, D] to [1, text_len, D] as the DiT does."""
    context = np.asarray(context, np.float32)[:, :text_len]
    pad = text_len - context.shape[1]
    return np.pad(context, [(0, 0), (0, pad), (0, 0)]) if pad else context


@dataclass
class _PackageArgs:
    frames_per_chunk: int
    in_dim: int


class PackageState:
    """The fp16 state buffers of a package and the index of the chunk being generated."""

    def __init__(self, buffers: dict[str, np.ndarray]):
        self.buffers = buffers
        self.chunk = 0

    def arrays(self) -> list:
        return []

    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers.values())


class PackageDiT:
    """A saved streaming DiT package, called like an S2DiT by the generation core (batch 1)."""

    def __init__(self, package, state: dict | None = None):
        latents = package.program.functions["denoise"].inputs["latents"].shape
        self.args = _PackageArgs(frames_per_chunk=int(latents[1]), in_dim=int(latents[4]))
        self.package = package
        self._buffers = state

    def make_cache(self) -> PackageState:
        """The given state buffers, or zeroed ones."""
        buffers = self.package.make_state() if self._buffers is None else self._buffers
        return PackageState(buffers)

    def __call__(self, x, t, context, cache: PackageState, update_cache: bool = False):
        inputs = {
            "latents": np.array(x),
            "t": np.array(t, np.float32)[:1],
            "context": np.array(context),
            "chunk": np.array([cache.chunk], np.int32),
        }
        function = "write" if update_cache else "denoise"
        out = self.package.predict(inputs, cache.buffers, function=function)
        if update_cache:
            cache.chunk += 1
        return mx.array(out["velocity"].astype(np.float32))


def _stream(model, context, noise: list[list[np.ndarray]], timesteps) -> Iterator[np.ndarray]:
    draws = [d for chunk in noise for d in chunk]
    _, frames, height, width, _ = draws[0].shape
    chunks = stream(
        model,
        mx.array(np.asarray(context, np.float32)),
        frames * len(noise),
        (height, width),
        Sampler.few_step(timesteps),
        noise=GivenNoise(draws),
    )
    for chunk in chunks:
        yield np.array(chunk.latents)


def mlx_stream(
    model, context: np.ndarray, noise: list[list[np.ndarray]], timesteps: list[float]
) -> Iterator[np.ndarray]:
    """Clean latent chunks from the MLX model with its own streaming cache."""
    return _stream(model, context, noise, timesteps)


def package_stream(
    package,
    context: np.ndarray,
    noise: list[list[np.ndarray]],
    timesteps: list[float],
    state: dict | None = None,
) -> Iterator[np.ndarray]:
    """Clean latent chunks from a saved package (numpy interpreter), states carried across calls."""
    return _stream(PackageDiT(package, state), context, noise, timesteps)


def mlx_vae_stream(vae, latents: list[np.ndarray]) -> Iterator[np.ndarray]:
    """Pixel frames per latent chunk from the MLX VAE's streaming decoder (first gives 1 frame)."""
    decoder = vae.decoder()
    for z in latents:
        yield np.array(decoder.decode(mx.array(z)))


def package_vae_stream(package, latents: list[np.ndarray], state: dict | None = None):
    """Pixel frames per latent chunk from a saved VAE decoder package, one latent frame a call.

    A package with a `first` function (Wan VAE) gets latent frame 0 there, the rest through its
    default function; otherwise (patch VAE) frame 0's call keeps only its last pixel frame.
    """
    state = package.make_state() if state is None else state
    has_first = "first" in package.functions
    first = True
    for z in latents:
        outs = []
        for i in range(z.shape[1]):
            function = "first" if first and has_first else None
            frames = package.predict({"latents": z[:, i : i + 1]}, state, function)["frames"]
            # The first latent frame ever stands for one pixel frame: keep its last.
            outs.append(frames[:, -1:] if first else frames)
            first = False
        yield np.concatenate(outs, axis=1).astype(np.float32)
