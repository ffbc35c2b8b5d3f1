"""Text-to-video generation: `Pipeline.from_pretrained(path).generate(prompt)`.

A Pipeline holds a model folder's DiT, VAE and text encoder and its defaults. It validates the
settings once, encodes the prompt, runs the generation core (s2dit_mlx/generation.py) and
decodes each clean latent chunk with the VAE's streaming decoder as soon as it is ready:

- "streaming": chunk by chunk through the DiT's caches (`generation.stream`), so frames come
  out while later chunks are still being generated;
- "bidirectional": the whole latent video at once (`generation.denoise`), then a chunked
  causal decode.

Example:

    from s2dit_mlx import Pipeline
    pipe = Pipeline.from_pretrained("path/or/hub-id")
    video = pipe.generate("a red fox running through snow", seed=1)  # uint8 [F, H, W, 3]
    for frames in pipe.stream("a red fox running through snow", seed=1):
        ...  # uint8 [f, H, W, 3] as each chunk is decoded
    run = pipe.start("a red fox", seed=1)   # the same, with per-chunk timings
    for chunk in run:
        chunk.frames, chunk.denoise_s, chunk.decode_s
    run.summary()                           # totals, frames/s, peak memory

`denoise()` + `decode()` split the bidirectional path in two and accept injected starting
noise and text embeddings (how tests/test_wan_pipeline_parity.py reproduces diffusers'
WanPipeline).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from . import generation, resources
from .errors import S2DiTError
from .loading import DEFAULTS, MODES, ModelBundle, load_model
from .validate import check_text
from .video_io import to_uint8

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
MAX_SEED = 2**64 - 1


@dataclass
class GenerationSettings:
    """Every setting of one generation, validated (recorded in the metadata sidecar)."""

    prompt: str
    negative_prompt: str
    frames: int
    height: int
    width: int
    steps: int
    seed: int
    guidance: float
    shift: float
    mode: str
    solver: str
    dtype: str

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)

    @property
    def sampler(self) -> generation.Sampler:
        """The generation core's view of the sampling settings."""
        return generation.Sampler(self.solver, self.steps, self.shift, self.guidance)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass
class VideoChunk:
    """One decoded chunk: uint8 frames [f, H, W, 3] and what it cost."""

    index: int
    frames: np.ndarray
    latents: mx.array
    denoise_s: float  # generating the clean latents (0 for a bidirectional video's later chunks)
    decode_s: float
    ready_s: float  # since the start of the generation, when the frames were handed out


@dataclass
class Generation:
    """One running generation: iterate it for VideoChunks; `summary()` once it is done."""

    settings: GenerationSettings
    text_encode_s: float
    _chunks: Iterator[VideoChunk]
    _start: float
    chunks: list[dict] = field(default_factory=list)
    _busy: float = 0.0

    def __iter__(self) -> Iterator[VideoChunk]:
        return self

    def __next__(self) -> VideoChunk:
        t0 = time.perf_counter()
        try:
            chunk = next(self._chunks)
        finally:
            self._busy += time.perf_counter() - t0
        self.chunks.append(
            {
                "frames": int(chunk.frames.shape[0]),
                "denoise_s": chunk.denoise_s,
                "decode_s": chunk.decode_s,
                "ready_s": chunk.ready_s,
            }
        )
        return chunk

    def summary(self) -> dict:
        """Totals: frames, chunks, time spent generating (not in the consumer), frames/s, memory."""
        frames = sum(c["frames"] for c in self.chunks)
        busy = self._busy + self.text_encode_s
        return {
            "settings": self.settings.to_dict(),
            "frames": frames,
            "chunks": len(self.chunks),
            "text_encode_s": self.text_encode_s,
            "first_frames_s": self.chunks[0]["ready_s"] if self.chunks else None,
            "generate_s": busy,
            "denoise_s": sum(c["denoise_s"] for c in self.chunks),
            "decode_s": sum(c["decode_s"] for c in self.chunks),
            "chunk_s": [c["denoise_s"] for c in self.chunks],
            "chunk_decode_s": [c["decode_s"] for c in self.chunks],
            "frames_per_s": frames / busy if busy > 0 else None,
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
        }


class Pipeline:
    """A loaded model (DiT + VAE + text encoder) that turns prompts into videos."""

    def __init__(
        self,
        dit,
        vae,
        text_encoder,
        defaults: dict | None = None,
        name: str = "",
        dtype: str | None = None,
        path=None,
    ):
        self.dit, self.vae, self.text_encoder = dit, vae, text_encoder
        self.defaults = {**DEFAULTS, **(defaults or {})}
        self.name = name
        self.path = path
        # The DiT runs in `dtype` (default: the folder's "dtype" default, else float32); the VAE
        # and the text encoder are small and stay as loaded.
        dtype = dtype or self.defaults.get("dtype") or "float32"
        if dtype not in DTYPES:
            raise S2DiTError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
        self.dtype = dtype
        dit.set_dtype(DTYPES[dtype])
        # Decode chunk k while chunk k + 1 is denoised (an MLX stream of its own).
        self.overlap_decode = True

    @classmethod
    def from_bundle(cls, bundle: ModelBundle, dtype: str | None = None) -> Pipeline:
        """Wrap what loading.load_model returned."""
        return cls(
            bundle.dit,
            bundle.vae,
            bundle.text_encoder,
            defaults=bundle.defaults,
            name=bundle.name,
            dtype=dtype,
            path=bundle.path,
        )

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str, dtype: str | None = None) -> Pipeline:
        """Load a model folder (local path or Hugging Face hub id)."""
        if dtype is not None and dtype not in DTYPES:
            raise S2DiTError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
        return cls.from_bundle(load_model(path_or_hub_id), dtype=dtype)

    # ------------------------------------------------------------------------------------------
    # Settings

    @property
    def spatial_multiple(self) -> int:
        """Height and width must be multiples of this: VAE factor x patch (x SSA stride)."""
        return self.vae.spatial_factor * self.dit.args.spatial_multiple()

    def _spatial_reason(self) -> str:
        parts = [f"VAE factor {self.vae.spatial_factor}", *self.dit.args.spatial_reasons()]
        return " x ".join(parts)

    def settings(self, prompt: str, **overrides) -> GenerationSettings:
        """Fill unset settings from the model's defaults and validate them all."""
        d = self.defaults
        values = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(values) - {f for f in GenerationSettings.__dataclass_fields__}
        if unknown:
            raise TypeError(f"unknown generation settings: {', '.join(sorted(unknown))}")
        s = GenerationSettings(
            prompt=prompt,
            negative_prompt=values.get("negative_prompt", d["negative_prompt"]),
            frames=values.get("frames", d["frames"]),
            height=values.get("height", d["height"]),
            width=values.get("width", d["width"]),
            steps=values.get("steps", d["steps"]),
            seed=values.get("seed", 0),
            guidance=values.get("guidance", d["guidance"]),
            shift=values.get("shift", d["shift"]),
            mode=values.get("mode", d["mode"]),
            solver=values.get("solver", d["solver"]),
            dtype=self.dtype,
        )
        self._validate(s)
        return s

    def _validate(self, s: GenerationSettings) -> None:
        check_text(s.prompt, "prompt")
        check_text(s.negative_prompt, "negative prompt")
        tf = self.vae.temporal_factor
        if not _is_int(s.frames) or s.frames < 1 or (s.frames - 1) % tf:
            examples = ", ".join(str(1 + tf * k) for k in range(5))
            raise S2DiTError(f"frames must be {tf}k + 1 ({examples}, ...), got {s.frames!r}")
        m = self.spatial_multiple
        for name in ("height", "width"):
            value = getattr(s, name)
            if not _is_int(value) or value < 1:
                raise S2DiTError(f"{name} must be a positive integer, got {value!r}")
            if value % m:
                lo = value // m * m
                near = f"{lo} or {lo + m}" if lo else f"{m}"
                raise S2DiTError(
                    f"{name} {value} is not divisible by {m} ({self._spatial_reason()}); try {near}"
                )
        if not _is_int(s.seed) or not 0 <= s.seed <= MAX_SEED:
            raise S2DiTError(f"seed must be an integer from 0 to 2**64 - 1, got {s.seed!r}")
        if s.mode not in MODES:
            raise S2DiTError(f"mode must be one of {', '.join(MODES)}, got {s.mode!r}")
        s.sampler.validate(streaming=s.mode == "streaming")

    def estimate(self, prompt: str = "", **settings) -> resources.Estimate:
        """Peak memory and time of generate() with these settings, estimated without running
        it (see s2dit_mlx/resources.py): `.peak_bytes`, `.seconds`, `.summary()`."""
        return resources.estimate_generate(self, self.settings(prompt, **settings))

    # ------------------------------------------------------------------------------------------
    # Generation

    def _encode_text(self, s: GenerationSettings) -> tuple[mx.array, mx.array | None]:
        dtype = DTYPES[self.dtype]
        context = self.text_encoder.encode([s.prompt]).astype(dtype)
        neg = None
        if s.sampler.guided:
            neg = self.text_encoder.encode([s.negative_prompt]).astype(dtype)
        mx.eval(context, neg if neg is not None else [])
        return context, neg

    def _per_expert(self, s: GenerationSettings) -> bool:
        # Wan2.2 A14B: each expert keeps its published guidance unless another was asked for.
        return s.guidance == self.defaults["guidance"]

    def _latent_shape(self, s: GenerationSettings) -> tuple[int, ...]:
        sf = self.vae.spatial_factor
        latent_frames = 1 + (s.frames - 1) // self.vae.temporal_factor
        return (1, latent_frames, s.height // sf, s.width // sf, self.dit.args.in_dim)

    def _frames_per_chunk(self, latent_frames: int) -> int:
        per_chunk = getattr(self.dit.args, "frames_per_chunk", latent_frames) or latent_frames
        return max(1, int(per_chunk))

    def start(self, prompt: str, *, progress: bool = False, **settings) -> Generation:
        """Validate the settings, encode the prompt and return the running Generation.

        Settings (keyword, None = the model's default): frames, height, width, steps, seed,
        guidance, negative_prompt, shift, mode ("streaming"|"bidirectional"), solver.
        """
        s = self.settings(prompt, **settings)
        mx.reset_peak_memory()
        start = time.perf_counter()
        context, neg = self._encode_text(s)
        text_s = time.perf_counter() - start
        return Generation(s, text_s, self._chunks(s, context, neg, progress, start), start)

    def _latent_chunks(self, s, context, neg, bar) -> Iterator[tuple[mx.array, float]]:
        """(clean latent chunk, seconds it took) in order."""
        dtype = DTYPES[self.dtype]
        shape = self._latent_shape(s)
        noise = generation.SeededNoise(s.seed)
        per_expert = self._per_expert(s)
        if s.mode == "streaming":
            for chunk in generation.stream(
                self.dit,
                context,
                shape[1],
                shape[2:4],
                s.sampler,
                noise=noise,
                neg_context=neg,
                per_expert_guidance=per_expert,
                dtype=dtype,
            ):
                yield chunk.latents, chunk.seconds
            return
        t0 = time.perf_counter()
        latents = generation.denoise(
            self.dit,
            context,
            shape,
            s.sampler,
            noise=noise,
            neg_context=neg,
            per_expert_guidance=per_expert,
            dtype=dtype,
            on_step=(lambda _: bar.update(1)) if bar is not None else None,
        )
        elapsed = time.perf_counter() - t0
        per_chunk = self._frames_per_chunk(shape[1])
        for i in range(0, shape[1], per_chunk):
            yield latents[:, i : i + per_chunk], elapsed if i == 0 else 0.0

    def _chunks(self, s, context, neg, progress: bool, start: float) -> Iterator[VideoChunk]:
        shape = self._latent_shape(s)
        num_chunks = math.ceil(shape[1] / self._frames_per_chunk(shape[1]))
        bar = None
        if progress:
            from tqdm import tqdm

            if s.mode == "bidirectional":
                bar = tqdm(total=s.steps, desc="denoising", unit="step", leave=True)
            else:
                bar = tqdm(total=num_chunks, desc="chunks", unit="chunk", leave=True)
        decoder = self.vae.decoder()
        # Chunk k decodes on its own stream while chunk k + 1 is denoised (the decode of the
        # first chunk is waited for at once, so the first frames come as early as they can).
        decode_stream = mx.new_stream(mx.default_device()) if self.overlap_decode else None
        frames_out = 0
        pending = None

        def finish(item) -> VideoChunk:
            nonlocal frames_out
            index, decoded, latents, denoise_s, t0 = item
            mx.eval(decoded)
            frames = to_uint8(decoded[0])
            frames_out += frames.shape[0]
            if bar is not None:
                bar.set_postfix_str(f"{frames_out / (time.perf_counter() - start):.2f} frames/s")
                if s.mode == "streaming":
                    bar.update(1)
            decode_s = time.perf_counter() - t0
            return VideoChunk(
                index, frames, latents, denoise_s, decode_s, time.perf_counter() - start
            )

        try:
            for index, (latents, denoise_s) in enumerate(self._latent_chunks(s, context, neg, bar)):
                t0 = time.perf_counter()
                if decode_stream is None:
                    decoded = decoder.decode(latents.astype(mx.float32))
                else:
                    with mx.stream(decode_stream):
                        decoded = decoder.decode(latents.astype(mx.float32))
                    mx.async_eval(decoded)
                item = (index, decoded, latents, denoise_s, t0)
                if pending is not None:
                    yield finish(pending)
                    pending = None
                if index == 0 or decode_stream is None:
                    yield finish(item)
                else:
                    pending = item
            if pending is not None:
                yield finish(pending)
        finally:
            if bar is not None:
                bar.close()

    def stream(self, prompt: str, *, progress: bool = False, **settings) -> Iterator[np.ndarray]:
        """Yield uint8 frame batches [f, H, W, 3] as each latent chunk is decoded.

        Settings are validated before this returns (see `start`).
        """
        run = self.start(prompt, progress=progress, **settings)
        return (chunk.frames for chunk in run)

    def generate(self, prompt: str, *, progress: bool = False, **settings) -> np.ndarray:
        """Generate a whole video -> uint8 [F, H, W, 3] (same settings as `start`)."""
        return np.concatenate(list(self.stream(prompt, progress=progress, **settings)), axis=0)

    # ------------------------------------------------------------------------------------------
    # The bidirectional path in two parts

    def denoise(
        self,
        prompt: str = "",
        *,
        latents: mx.array | None = None,
        context: mx.array | None = None,
        negative_context: mx.array | None = None,
        schedule: str = "wan",
        progress: bool = False,
        **settings,
    ) -> mx.array:
        """Bidirectional sampling only: the clean latents [1, T, h, w, C] that generate() decodes.

        The same loop as generate(mode="bidirectional"), with optional injections for
        reproducing another implementation: `latents` replaces the seeded starting noise
        [1, T, h, w, C] (its shape must match frames/height/width), `context` /
        `negative_context` replace the text encoder's output for the prompt / negative prompt
        ([1, L, text_dim]); `schedule="diffusers"` uses diffusers' UniPC noise levels
        (sampling.FlowUniPCSolver). Decode the result with `decode()`.
        """
        s = self.settings(prompt, **{"mode": "bidirectional", **settings})
        if s.mode != "bidirectional":
            raise S2DiTError("denoise() runs the bidirectional mode only")
        sampler = generation.Sampler(s.solver, s.steps, s.shift, s.guidance, grid=schedule)
        sampler.validate(streaming=False)
        shape = self._latent_shape(s)
        if latents is not None and tuple(latents.shape) != shape:
            raise S2DiTError(
                f"latents must have shape {shape} for {s.frames} frames at {s.height}x{s.width}, "
                f"got {tuple(latents.shape)}"
            )
        dtype = DTYPES[self.dtype]
        if context is None or (sampler.guided and negative_context is None):
            encoded, encoded_neg = self._encode_text(s)
            context = encoded if context is None else context
            negative_context = encoded_neg if negative_context is None else negative_context
        for name, c in (("context", context), ("negative_context", negative_context)):
            if c is not None and (c.ndim != 3 or c.shape[0] != 1):
                raise S2DiTError(f"{name} must be [1, L, dim], got {tuple(c.shape)}")
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=s.steps, desc="denoising", unit="step", leave=True)
        try:
            return generation.denoise(
                self.dit,
                context.astype(dtype),
                shape,
                sampler,
                noise=generation.SeededNoise(s.seed),
                latents=latents,
                neg_context=negative_context.astype(dtype) if sampler.guided else None,
                per_expert_guidance=self._per_expert(s),
                dtype=dtype,
                on_step=(lambda _: bar.update(1)) if bar is not None else None,
            )
        finally:
            if bar is not None:
                bar.close()

    def decode(self, latents: mx.array) -> mx.array:
        """Latents [B, T, h, w, C] -> float frames [B, F, H, W, 3] in [-1, 1], chunk by chunk
        with one streaming decoder, as generate() decodes them."""
        per_chunk = self._frames_per_chunk(latents.shape[1])
        decoder = self.vae.decoder()
        frames = [
            decoder.decode(latents[:, i : i + per_chunk].astype(mx.float32))
            for i in range(0, latents.shape[1], per_chunk)
        ]
        return mx.concatenate(frames, axis=1)
