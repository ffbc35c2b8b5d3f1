"""Drive the MLX model and a saved package through the same streaming loop, and compare them.

Both loops are stream_latent_chunks with the noise given from outside (so the Core ML side, which
has no MLX random generator, sees the same numbers): per chunk, start from noise[0]; at each t of
the few-step list predict x0 = x - t/1000 * v and re-noise it to the next t with noise[i + 1];
then one pass at t=0 over the clean chunk writes it into the state.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import mlx.core as mx
import numpy as np

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


def mlx_stream(
    model, context: np.ndarray, noise: list[list[np.ndarray]], timesteps: list[float]
) -> Iterator[np.ndarray]:
    """Clean latent chunks from the MLX model with its own streaming cache."""
    cache = model.make_cache()
    ctx = mx.array(context)
    for chunk_noise in noise:
        x = mx.array(chunk_noise[0])
        x0 = x
        for i, t in enumerate(timesteps):
            v = model(x, mx.array([t], dtype=mx.float32), ctx, cache=cache)
            x0 = x - (t / 1000.0) * v
            if i + 1 < len(timesteps):
                s = timesteps[i + 1] / 1000.0
                x = (1.0 - s) * x0 + s * mx.array(chunk_noise[i + 1])
            mx.eval(x, x0)
        model(x0, mx.zeros((1,), dtype=mx.float32), ctx, cache=cache, update_cache=True)
        mx.eval(cache.arrays())
        yield np.array(x0)


def package_stream(
    package,
    context: np.ndarray,
    noise: list[list[np.ndarray]],
    timesteps: list[float],
    state: dict | None = None,
) -> Iterator[np.ndarray]:
    """Clean latent chunks from a saved package (numpy interpreter), states carried across calls."""
    state = package.make_state() if state is None else state
    for c, chunk_noise in enumerate(noise):
        chunk = np.array([c], np.int32)
        x = chunk_noise[0]
        x0 = x
        for i, t in enumerate(timesteps):
            inputs = {
                "latents": x,
                "t": np.array([t], np.float32),
                "context": context,
                "chunk": chunk,
            }
            x0 = package.predict(inputs, state, function="denoise")["x0"].astype(np.float32)
            if i + 1 < len(timesteps):
                s = timesteps[i + 1] / 1000.0
                x = (1.0 - s) * x0 + s * chunk_noise[i + 1]
        inputs = {"latents": x0, "t": np.zeros(1, np.float32), "context": context, "chunk": chunk}
        package.predict(inputs, state, function="write")
        yield x0


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
