"""Text-to-video generation: `Pipeline.from_pretrained(path).generate(prompt)`.

Two modes, chosen by the model folder's defaults (or per call):

- "streaming": chunk by chunk with the per-layer caches (streaming.stream_latent_chunks),
  each chunk integrated by the solver (Euler or UniPC) or, for distilled students, by the
  few-step re-noising sampler (solver "few-step"); each clean latent chunk is decoded by the
  VAE's streaming decoder at once, so `stream()` yields frames while later chunks are still
  being generated;
- "bidirectional": a flow-matching solver (Euler or UniPC) over the whole latent
  sequence with classifier-free guidance, then a chunked causal decode.

Example:

    from s2dit_mlx.pipeline import Pipeline
    pipe = Pipeline.from_pretrained("path/or/hub-id")
    video = pipe.generate("a red fox running through snow", seed=1)  # uint8 [F, H, W, 3]
    for frames in pipe.stream("a red fox running through snow", seed=1):
        ...  # uint8 [f, H, W, 3] as each chunk is decoded

`denoise()` + `decode()` split the bidirectional path in two and accept injected starting
noise and text embeddings (how tests/test_wan_pipeline_parity.py reproduces diffusers'
WanPipeline).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import mlx.core as mx
import numpy as np

from . import resources, sampling
from .errors import S2DiTError
from .kernels import cpu as cpu_kernels
from .loading import DEFAULTS, MODES, ModelBundle, load_model
from .streaming import stream_latent_chunks
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


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


class Pipeline:
    """A loaded model (DiT + VAE + text encoder) that turns prompts into videos."""

    def __init__(
        self,
        dit,
        vae,
        text_encoder,
        defaults: dict | None = None,
        name: str = "",
        dtype: str = "float32",
        path=None,
    ):
        self.dit, self.vae, self.text_encoder = dit, vae, text_encoder
        self.defaults = {**DEFAULTS, **(defaults or {})}
        self.name = name
        self.path = path
        if dtype not in DTYPES:
            raise S2DiTError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
        self.dtype = dtype
        # The DiT runs in `dtype` (whatever its weights were saved in); the VAE and the text
        # encoder are small and stay as loaded.
        dit.set_dtype(DTYPES[dtype])
        self.last_stats: dict = {}

    @classmethod
    def from_bundle(cls, bundle: ModelBundle, dtype: str = "float32") -> Pipeline:
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
    def from_pretrained(cls, path_or_hub_id: str, dtype: str = "float32") -> Pipeline:
        """Load a model folder (local path or Hugging Face hub id)."""
        if dtype not in DTYPES:
            raise S2DiTError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
        return cls.from_bundle(load_model(path_or_hub_id), dtype=dtype)

    # ------------------------------------------------------------------------------------------
    # Sizes

    @property
    def spatial_multiple(self) -> int:
        """Height and width must be multiples of this: VAE factor x patch (x SSA stride)."""
        return self.vae.spatial_factor * self.dit.args.spatial_multiple()

    def _spatial_reason(self) -> str:
        args = self.dit.args
        parts = [f"VAE factor {self.vae.spatial_factor}", f"patch {args.patch_size[1]}"]
        if "ssa" in args.layers:
            parts.append(f"SSA stride {args.ssa_stride}")
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
        if not _is_int(s.steps) or s.steps < 1:
            raise S2DiTError(f"steps must be a positive integer, got {s.steps!r}")
        if not _is_int(s.seed) or not 0 <= s.seed <= MAX_SEED:
            raise S2DiTError(f"seed must be an integer from 0 to 2**64 - 1, got {s.seed!r}")
        if not _is_number(s.guidance) or not math.isfinite(s.guidance) or s.guidance < 0:
            raise S2DiTError(f"guidance must be a finite number >= 0, got {s.guidance!r}")
        if not _is_number(s.shift) or not math.isfinite(s.shift) or s.shift <= 0:
            raise S2DiTError(f"shift must be a positive number, got {s.shift!r}")
        if s.mode not in MODES:
            raise S2DiTError(f"mode must be one of {', '.join(MODES)}, got {s.mode!r}")
        if s.solver not in sampling.SAMPLERS:
            raise S2DiTError(
                f"solver must be one of {', '.join(sampling.SAMPLERS)}, got {s.solver!r}"
            )
        if s.solver == sampling.FEW_STEP and s.mode != "streaming":
            raise S2DiTError(f"the {sampling.FEW_STEP} solver runs in streaming mode only")

    def estimate(self, prompt: str = "", **settings) -> resources.Estimate:
        """Peak memory and time of generate() with these settings, estimated without running
        it (see s2dit_mlx/resources.py): `.peak_bytes`, `.seconds`, `.summary()`."""
        return resources.estimate_generate(self, self.settings(prompt, **settings))

    # ------------------------------------------------------------------------------------------
    # Generation

    def _encode_text(self, s: GenerationSettings, use_cfg: bool):
        dtype = DTYPES[self.dtype]
        context = self.text_encoder.encode([s.prompt]).astype(dtype)
        neg = self.text_encoder.encode([s.negative_prompt]).astype(dtype) if use_cfg else None
        mx.eval(context, neg if neg is not None else [])
        return context, neg

    def _bidirectional_latents(
        self,
        s: GenerationSettings,
        context,
        neg,
        shape,
        bar,
        latents: mx.array | None = None,
        schedule: str = "wan",
    ) -> mx.array:
        dtype = DTYPES[self.dtype]
        solver = sampling.make_solver(s.solver, s.steps, s.shift, schedule=schedule)
        if latents is None:
            x = mx.random.normal(shape, key=mx.random.key(s.seed)).astype(dtype)
        else:
            x = latents.astype(dtype)
        for t in solver.timesteps:
            t_vec = mx.full((shape[0],), float(t), dtype=mx.float32)
            dit, guidance = self.dit, s.guidance
            if hasattr(self.dit, "select"):
                # Wan2.2 A14B: one expert per noise level, each with its own published CFG
                # scale, unless the caller asked for another guidance than the default.
                dit, expert_guidance = self.dit.select(float(t))
                if s.guidance == self.defaults["guidance"]:
                    guidance = expert_guidance
            v = dit(x, t_vec, context)
            if neg is not None:
                v = sampling.cfg(v, dit(x, t_vec, neg), guidance)
            x = solver.step(v, x).astype(dtype)
            mx.eval(x)
            if bar is not None:
                bar.update(1)
        return x

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
        use_cfg = s.guidance != 1.0
        shape = self._latent_shape(s)
        if latents is not None and tuple(latents.shape) != shape:
            raise S2DiTError(
                f"latents must have shape {shape} for {s.frames} frames at {s.height}x{s.width}, "
                f"got {tuple(latents.shape)}"
            )
        dtype = DTYPES[self.dtype]
        if context is None or (use_cfg and negative_context is None):
            with cpu_kernels.enabled():
                encoded, encoded_neg = self._encode_text(s, use_cfg)
            context = encoded if context is None else context
            negative_context = encoded_neg if negative_context is None else negative_context
        for name, c in (("context", context), ("negative_context", negative_context)):
            if c is not None and (c.ndim != 3 or c.shape[0] != 1):
                raise S2DiTError(f"{name} must be [1, L, dim], got {tuple(c.shape)}")
        context = context.astype(dtype)
        neg = negative_context.astype(dtype) if use_cfg else None
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=s.steps, desc="denoising", unit="step", leave=True)
        try:
            with cpu_kernels.enabled():
                return self._bidirectional_latents(s, context, neg, shape, bar, latents, schedule)
        finally:
            if bar is not None:
                bar.close()

    def decode(self, latents: mx.array) -> mx.array:
        """Latents [B, T, h, w, C] -> float frames [B, F, H, W, 3] in [-1, 1], chunk by chunk
        with one streaming decoder, as generate() decodes them."""
        per_chunk = self._frames_per_chunk(latents.shape[1])
        decoder = self.vae.decoder()
        with cpu_kernels.enabled():
            frames = [
                decoder.decode(latents[:, i : i + per_chunk].astype(mx.float32))
                for i in range(0, latents.shape[1], per_chunk)
            ]
        return mx.concatenate(frames, axis=1)

    def _latent_shape(self, s: GenerationSettings) -> tuple[int, ...]:
        sf = self.vae.spatial_factor
        latent_frames = 1 + (s.frames - 1) // self.vae.temporal_factor
        return (1, latent_frames, s.height // sf, s.width // sf, self.dit.args.in_dim)

    def _frames_per_chunk(self, latent_frames: int) -> int:
        per_chunk = getattr(self.dit.args, "frames_per_chunk", latent_frames) or latent_frames
        return max(1, int(per_chunk))

    def stream(self, prompt: str, *, progress: bool = False, **settings) -> Iterator[np.ndarray]:
        """Yield uint8 frame batches [f, H, W, 3] as each latent chunk is decoded.

        Settings (keyword, None = the model's default): frames, height, width, steps, seed,
        guidance, negative_prompt, shift, mode ("streaming"|"bidirectional"), solver.
        After the last batch, `self.last_stats` holds timings and peak memory.
        """
        s = self.settings(prompt, **settings)
        return cpu_kernels.step_enabled(self._stream(s, progress))

    def _stream(self, s: GenerationSettings, progress: bool) -> Iterator[np.ndarray]:
        dtype = DTYPES[self.dtype]
        shape = self._latent_shape(s)
        _, latent_frames, lh, lw, _ = shape
        per_chunk = self._frames_per_chunk(latent_frames)
        num_chunks = math.ceil(latent_frames / per_chunk)
        use_cfg = s.guidance != 1.0

        stats: dict = {"settings": s.to_dict(), "frames": 0, "chunks": 0}
        self.last_stats = stats
        mx.reset_peak_memory()
        busy = 0.0  # seconds spent inside this generator (not in the consumer)
        start = t0 = time.perf_counter()

        context, neg = self._encode_text(s, use_cfg)
        stats["text_encode_s"] = time.perf_counter() - t0

        bar = None
        if progress:
            from tqdm import tqdm

            if s.mode == "bidirectional":
                bar = tqdm(total=s.steps, desc="denoising", unit="step", leave=True)
            else:
                bar = tqdm(total=num_chunks, desc="chunks", unit="chunk", leave=True)
        try:
            if s.mode == "streaming":
                if s.solver == sampling.FEW_STEP:
                    sampler = {"timesteps": sampling.few_step_timesteps(s.steps, s.shift)}
                else:
                    sampler = {"solver": partial(sampling.make_solver, s.solver, s.steps, s.shift)}
                chunks = stream_latent_chunks(
                    self.dit,
                    context,
                    num_latent_frames=latent_frames,
                    latent_height=lh,
                    latent_width=lw,
                    seed=s.seed,
                    neg_context=neg,
                    guidance=float(s.guidance),
                    dtype=dtype,
                    **sampler,
                )
            else:
                t0 = time.perf_counter()
                latents = self._bidirectional_latents(s, context, neg, shape, bar)
                stats["denoise_s"] = time.perf_counter() - t0
                if bar is not None:
                    bar.close()
                    bar = None
                chunks = (latents[:, i : i + per_chunk] for i in range(0, latent_frames, per_chunk))
            decoder = self.vae.decoder()
            stats["chunk_s"], stats["decode_s"] = [], []
            busy += time.perf_counter() - start
            resumed = time.perf_counter()
            while True:
                t0 = time.perf_counter()
                chunk = next(chunks, None)
                if chunk is None:
                    break
                mx.eval(chunk)
                t1 = time.perf_counter()
                frames = decoder.decode(chunk.astype(mx.float32))
                batch = to_uint8(frames[0])
                t2 = time.perf_counter()
                stats["chunk_s"].append(t1 - t0)
                stats["decode_s"].append(t2 - t1)
                stats["chunks"] += 1
                stats["frames"] += batch.shape[0]
                if stats["chunks"] == 1:
                    stats["first_frames_s"] = busy + (t2 - resumed)
                if bar is not None:
                    wall = time.perf_counter() - start
                    bar.set_postfix_str(f"{stats['frames'] / wall:.2f} frames/s")
                    bar.update(1)
                busy += time.perf_counter() - resumed
                yield batch
                resumed = time.perf_counter()
            busy += time.perf_counter() - resumed
        finally:
            if bar is not None:
                bar.close()
        stats["generate_s"] = busy
        stats["frames_per_s"] = stats["frames"] / busy if busy > 0 else None
        stats["peak_memory_gb"] = mx.get_peak_memory() / 1e9

    def generate(self, prompt: str, *, progress: bool = False, **settings) -> np.ndarray:
        """Generate a whole video -> uint8 [F, H, W, 3] (same settings as `stream`)."""
        batches = list(self.stream(prompt, progress=progress, **settings))
        return np.concatenate(batches, axis=0)
