"""The generation core: the one place that turns text embeddings into clean latents.

Two loops, both with explicit arguments (model, text, noise source, sampler) and validated
settings, both calling `on_step(StepInfo)` after every denoising step (the hook training and
teacher caching use):

- `denoise`: bidirectional, the whole latent video at once, integrated by an ODE solver (Euler
  or UniPC) with classifier-free guidance;
- `stream`: chunk by chunk through the model's streaming caches. Each chunk starts from noise
  and is denoised given the clean chunks in the caches, by an ODE solver or by the few-step
  sampler of distilled students (predict x0, re-noise it to the next level); then one pass at
  t = 0 over the clean chunk writes it into the caches. It yields a `ChunkResult` per chunk,
  and its `StreamState` (caches, noise keys, position) can be saved, restored and branched.

Convention (Wan / rectified flow): x_s = (1 - s) x0 + s noise, the model is called with
t = 1000 s and predicts v = noise - x0, so x0 = x_s - s v.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from . import rng, sampling
from .cache import StreamCache, load_cache, save_cache
from .errors import S2DiTError

FEW_STEP = sampling.FEW_STEP
SAMPLERS = sampling.SAMPLERS


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Sampler:
    """How a chunk (or a whole video) is denoised: the solver, its steps and shift, guidance.

    `name`: "euler" or "unipc" (ODE solvers, `steps` points on the shifted schedule), or
    "few-step" (distilled students: `steps` points from 1000 down, shifted, x0 re-noised between
    them; streaming only). `grid`: the UniPC noise levels ("wan" or "diffusers").
    """

    name: str = "euler"
    steps: int = 16
    shift: float = 5.0
    guidance: float = 1.0
    grid: str = "wan"
    # few-step only: explicit model timesteps (descending, in (0, 1000]) instead of the
    # shifted linspace, e.g. a student's points on its teacher's step grid.
    points: tuple[float, ...] | None = None

    @classmethod
    def few_step(cls, points, guidance: float = 1.0) -> Sampler:
        """The few-step sampler on explicit timesteps."""
        points = tuple(float(t) for t in points)
        return cls(FEW_STEP, steps=len(points), shift=1.0, guidance=guidance, points=points)

    def validate(self, streaming: bool = True) -> Sampler:
        """Raise S2DiTError naming the first bad field; returns self."""
        if self.name not in SAMPLERS:
            raise S2DiTError(f"solver must be one of {', '.join(SAMPLERS)}, got {self.name!r}")
        if self.name == FEW_STEP and not streaming:
            raise S2DiTError(f"the {FEW_STEP} solver runs in streaming mode only")
        if not _is_int(self.steps) or self.steps < 1:
            raise S2DiTError(f"steps must be a positive integer, got {self.steps!r}")
        if not _is_number(self.shift) or not math.isfinite(self.shift) or self.shift <= 0:
            raise S2DiTError(f"shift must be a positive number, got {self.shift!r}")
        if not _is_number(self.guidance) or not math.isfinite(self.guidance) or self.guidance < 0:
            raise S2DiTError(f"guidance must be a finite number >= 0, got {self.guidance!r}")
        if self.grid not in sampling.UNIPC_SCHEDULES:
            raise S2DiTError(f"unknown UniPC grid {self.grid!r}")
        if self.points is not None:
            pts = list(self.points)
            if self.name != FEW_STEP or len(pts) != self.steps:
                raise S2DiTError("explicit timesteps need the few-step sampler, one per step")
            ok = all(_is_number(t) and 0 < t <= 1000 for t in pts)
            if not ok or any(a <= b for a, b in zip(pts, pts[1:], strict=False)):
                raise S2DiTError(
                    f"few-step timesteps must fall in (0, 1000], strictly decreasing, got {pts}"
                )
        return self

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance runs (a negative pass per step)."""
        return self.guidance != 1.0

    def solver(self) -> sampling.FlowEulerSolver | sampling.FlowUniPCSolver:
        """A fresh ODE solver (not for the few-step sampler)."""
        return sampling.make_solver(self.name, self.steps, self.shift, schedule=self.grid)

    def timesteps(self) -> list[float]:
        """The t (0..1000) the model is called with, in order."""
        if self.points is not None:
            return list(self.points)
        if self.name == FEW_STEP:
            return sampling.few_step_timesteps(self.steps, self.shift)
        return [float(t) for t in self.solver().timesteps]

    def passes_per_chunk(self) -> int:
        """Model passes per streamed chunk: one per step (two with guidance) plus the write
        (deferred to the next chunk, so a stream's last chunk makes one fewer)."""
        return self.steps * (2 if self.guided else 1) + 1


# ----------------------------------------------------------------------------------------------
# Noise


class NoiseSource:
    """Where the starting and re-noising noise comes from: `draw(shape)`, one call per draw."""

    def draw(self, shape: tuple[int, ...]) -> mx.array:
        """The next noise draw of `shape` ([B, ...])."""
        raise NotImplementedError

    @property
    def state(self) -> dict[str, mx.array]:
        """Arrays that say where the source stands (for saving a stream)."""
        return {}

    @state.setter
    def state(self, value: dict[str, mx.array]) -> None:
        pass

    def copy(self) -> NoiseSource:
        """An independent source at the same position."""
        raise NotImplementedError


class SeededNoise(NoiseSource):
    """One key chain per sample: draw d of sample i uses the d-th split of its key.

    `SeededNoise(seed)` is what `s2dit generate --seed` uses (one sample, key(seed));
    `SeededNoise.for_samples(seed, indices)` keys each sample by (seed, global index), so a
    sample's noise does not depend on the batch it was drawn in (training, teacher caches).
    """

    def __init__(self, seed: int | None = None, keys: mx.array | None = None):
        if keys is None:
            keys = mx.random.key(seed)[None]
        self.keys = keys  # [B, 2] uint32

    @classmethod
    def for_samples(cls, seed: int, indices: list[int]) -> SeededNoise:
        """Keys for global sample indices (s2dit_mlx.rng, stream "noise")."""
        return cls(keys=rng.sample_keys(seed, indices))

    def draw(self, shape: tuple[int, ...]) -> mx.array:
        if shape[0] != self.keys.shape[0]:
            raise S2DiTError(f"noise for {shape[0]} samples, but {self.keys.shape[0]} keys")
        pairs = [mx.random.split(k) for k in self.keys]
        self.keys = mx.stack([p[0] for p in pairs])
        return mx.stack([mx.random.normal(shape[1:], key=p[1]) for p in pairs])

    @property
    def state(self) -> dict[str, mx.array]:
        return {"keys": self.keys}

    @state.setter
    def state(self, value: dict[str, mx.array]) -> None:
        self.keys = value["keys"]

    def copy(self) -> SeededNoise:
        return SeededNoise(keys=self.keys)


class GivenNoise(NoiseSource):
    """Draws taken in order from a list of arrays (to reproduce another implementation)."""

    def __init__(self, draws: list):
        self.draws = list(draws)
        self.used = 0

    def draw(self, shape: tuple[int, ...]) -> mx.array:
        if self.used >= len(self.draws):
            raise S2DiTError(f"given noise ran out after {self.used} draws")
        x = mx.array(self.draws[self.used])
        self.used += 1
        if tuple(x.shape) != tuple(shape):
            raise S2DiTError(f"given noise draw {self.used} has shape {x.shape}, needs {shape}")
        return x

    def copy(self) -> GivenNoise:
        other = GivenNoise(self.draws)
        other.used = self.used
        return other


# ----------------------------------------------------------------------------------------------
# Guided velocity


@dataclass
class StepInfo:
    """One denoising step, as `on_step` sees it: x_t entering the step and the x0 predicted."""

    chunk: int | None  # None in the bidirectional loop
    step: int
    t: float
    x_t: mx.array
    x0: mx.array


def _guidance_at(model, t: float, guidance: float, per_expert: bool) -> float:
    """The guidance at t: a two-expert model's own per-expert scale when `per_expert`."""
    if per_expert and hasattr(model, "select"):
        return model.select(t)[1]
    return guidance


class _Velocity:
    """The (guided) velocity of x at t; a negative prompt of the same shape rides in one batch."""

    def __init__(self, model, context, neg_context, sampler: Sampler, per_expert: bool):
        self.model, self.sampler, self.per_expert = model, sampler, per_expert
        self.use_cfg = sampler.guided and neg_context is not None
        self.batch = context.shape[0]
        # One doubled batch halves the dispatches of two passes; the model is per-sample, so this
        # equals two caches. Unequal shapes cannot stack: then two passes, two caches.
        self.batched = self.use_cfg and neg_context.shape == context.shape
        if self.batched:
            context = mx.concatenate([context, neg_context.astype(context.dtype)])
        self.context, self.neg_context = context, neg_context
        self.copies = 2 if self.batched else 1

    def stacked(self, x: mx.array) -> mx.array:
        return mx.concatenate([x] * self.copies) if self.copies > 1 else x

    def __call__(self, x, t: float, cache=None, neg_cache=None) -> mx.array:
        guidance = _guidance_at(self.model, t, self.sampler.guidance, self.per_expert)
        return self.at(x, self.t_vector(t), guidance, cache, neg_cache)

    def t_vector(self, t: float) -> mx.array:
        """t for every sample of a (possibly doubled) batch."""
        return mx.full((self.copies * self.batch,), t, dtype=mx.float32)

    def at(self, x, t_vec: mx.array, guidance: float, cache=None, neg_cache=None) -> mx.array:
        """The guided velocity at the model timesteps `t_vec` (an array: traceable)."""
        kwargs = {} if cache is None else {"cache": cache}
        v = self.model(self.stacked(x), t_vec, self.context, **kwargs)
        if not self.use_cfg:
            return v
        if self.batched:
            v, v_neg = v[: self.batch], v[self.batch :]
        else:
            neg_kwargs = {} if neg_cache is None else {"cache": neg_cache}
            v_neg = self.model(x, t_vec[: self.batch], self.neg_context, **neg_kwargs)
        return sampling.cfg(v, v_neg, guidance)

    def write(self, x0: mx.array, cache, neg_cache) -> None:
        """The clean pass at t = 0 that writes x0 into the caches."""
        zero = mx.zeros((self.copies * self.batch,), dtype=mx.float32)
        self.model(self.stacked(x0), zero, self.context, cache=cache, update_cache=True)
        if neg_cache is not None:
            self.model(x0, zero[: self.batch], self.neg_context, cache=neg_cache, update_cache=True)


class _CompiledChunk:
    """A chunk's denoising passes as one compiled MLX graph (`stream(..., compile=True)`).

    The caches are inputs and outputs of the graph (a denoising pass writes its keys into a
    scratch slot), and t is an array, so the chunk's passes share one trace. The trace is made
    afresh for every chunk: the frame offset (RoPE), the ring slots and the mask are Python
    values of the chunk that the trace holds as constants.
    """

    def __init__(self, velocity: _Velocity, caches: list):
        self.velocity = velocity
        self.layers = [layer for cache in caches for layer in cache.layers]
        self.caches = caches
        self.fn = mx.compile(self._pass)

    def _pass(self, x, t_vec, states, guidance):
        for layer, state in zip(self.layers, states, strict=True):
            layer.state = state
        v = self.velocity.at(x, t_vec, guidance, *self.caches)
        return v, [layer.state for layer in self.layers]

    def __call__(self, x, t: float, *caches) -> mx.array:
        # `caches`: the velocity's signature; the traced graph holds its own (self.caches).
        guidance = self.velocity.sampler.guidance
        states = [layer.state for layer in self.layers]
        v, states = self.fn(x, self.velocity.t_vector(t), states, guidance)
        for layer, state in zip(self.layers, states, strict=True):
            layer.state = state
        return v


def _compilable(model) -> bool:
    """Whether a chunk's passes can be one MLX graph: a single DiT, no module that computes
    eagerly (the opt-in CPU kernels evaluate their inputs, which a trace cannot)."""
    if hasattr(model, "select"):
        return False
    return not any(getattr(m, "computes_eagerly", False) for _, m in model.named_modules())


# ----------------------------------------------------------------------------------------------
# Bidirectional


def denoise(
    model,
    context: mx.array,
    shape: tuple[int, ...],
    sampler: Sampler,
    *,
    noise: NoiseSource | None = None,
    latents: mx.array | None = None,
    neg_context: mx.array | None = None,
    per_expert_guidance: bool = False,
    dtype: mx.Dtype = mx.float32,
    on_step: Callable[[StepInfo], None] | None = None,
) -> mx.array:
    """Clean latents [B, T, h, w, C] of a whole video, integrated by the sampler's ODE solver.

    The start is `latents` when given, else a draw of `noise`; guidance needs `neg_context`.
    """
    sampler.validate(streaming=False)
    if latents is None:
        if noise is None:
            raise S2DiTError("denoise needs a noise source or starting latents")
        latents = noise.draw(shape)
    elif tuple(latents.shape) != tuple(shape):
        raise S2DiTError(f"latents must have shape {tuple(shape)}, got {tuple(latents.shape)}")
    velocity = _Velocity(model, context, neg_context, sampler, per_expert_guidance)
    solver = sampler.solver()
    x = latents.astype(dtype)
    for i, t in enumerate(solver.timesteps):
        v = velocity(x, float(t))
        x_t = x
        x = solver.step(v, x).astype(dtype)
        mx.eval(x)
        if on_step is not None:
            sigma = float(solver.sigmas[i])
            on_step(StepInfo(None, i, float(t), x_t, (x_t - sigma * v).astype(dtype)))
    return x


# ----------------------------------------------------------------------------------------------
# Streaming


@dataclass
class StreamState:
    """Everything a stream needs to continue: the caches, the noise source and the position."""

    cache: StreamCache
    neg_cache: StreamCache | None
    noise: NoiseSource
    chunk: int = 0  # chunks generated so far
    frames: int = 0  # latent frames generated so far
    # The last chunk's clean latents, not yet written into the caches: its clean pass runs when
    # the next chunk is asked for, so a stream's final chunk costs no write pass.
    pending: mx.array | None = None

    def arrays(self) -> list[mx.array]:
        """Every array held (for mx.eval)."""
        neg = self.neg_cache.arrays() if self.neg_cache is not None else []
        pending = [self.pending] if self.pending is not None else []
        return self.cache.arrays() + neg + list(self.noise.state.values()) + pending

    def nbytes(self) -> int:
        """Bytes of the caches."""
        return self.cache.nbytes() + (self.neg_cache.nbytes() if self.neg_cache else 0)

    def copy(self) -> StreamState:
        """An independent state (branch a stream: both continue from here)."""
        neg = self.neg_cache.copy() if self.neg_cache is not None else None
        return StreamState(
            self.cache.copy(), neg, self.noise.copy(), self.chunk, self.frames, self.pending
        )

    def save(self, path) -> None:
        """Write the state to one safetensors file (atomically)."""
        caches = {"cache": self.cache}
        if self.neg_cache is not None:
            caches["neg_cache"] = self.neg_cache
        arrays = {f"noise.{k}": v for k, v in self.noise.state.items()}
        if self.pending is not None:
            arrays["pending"] = self.pending
        save_cache(path, caches, arrays, {"chunk": self.chunk, "frames": self.frames})

    @classmethod
    def load(cls, path, noise: NoiseSource | None = None) -> StreamState:
        """Read a saved state; the noise source (a SeededNoise by default) gets its saved keys."""
        caches, arrays, extra = load_cache(path)
        noise = noise if noise is not None else SeededNoise(0)
        saved = {k[len("noise.") :]: v for k, v in arrays.items() if k.startswith("noise.")}
        if saved:
            noise.state = saved
        return cls(
            caches["cache"],
            caches.get("neg_cache"),
            noise,
            int(extra["chunk"]),
            int(extra["frames"]),
            arrays.get("pending"),  # absent in states saved before the write was deferred
        )


@dataclass
class ChunkResult:
    """One streamed chunk: its clean latents [B, f, h, w, C], where it sits, what it cost."""

    index: int
    start_frame: int
    latents: mx.array
    seconds: float
    passes: int  # model passes made for it: its denoising passes and the previous chunk's write
    stats: dict = field(default_factory=dict)


def new_stream_state(
    model, noise: NoiseSource, guided: bool, context: mx.array, neg_context: mx.array | None
) -> StreamState:
    """Fresh caches (a second one when a negative prompt cannot share the batch)."""
    separate = guided and neg_context is not None and neg_context.shape != context.shape
    return StreamState(model.make_cache(), model.make_cache() if separate else None, noise)


def stream(
    model,
    context: mx.array,
    num_frames: int,
    latent_size: tuple[int, int],
    sampler: Sampler,
    *,
    noise: NoiseSource | None = None,
    neg_context: mx.array | None = None,
    state: StreamState | None = None,
    per_expert_guidance: bool = False,
    dtype: mx.Dtype = mx.float32,
    on_step: Callable[[StepInfo], None] | None = None,
    compile: bool = False,
) -> Iterator[ChunkResult]:
    """Generate clean latent chunks until `num_frames` latent frames exist, one chunk at a time.

    `state` continues an earlier stream (its caches, noise and position); without it a fresh
    one is made from `noise`. After each yield `state` is consistent and can be saved; it holds
    the chunk just yielded as `pending`, written into the caches (with this call's context) when
    the next chunk is asked for.
    `compile`: run each chunk's denoising passes as one compiled MLX graph (from this call's
    second chunk on, once the text side is cached; single-DiT models without CPU kernels only,
    else ignored).
    """
    sampler.validate(streaming=True)
    args = model.args
    if not _is_int(num_frames) or num_frames < 1:
        raise S2DiTError(f"number of latent frames must be a positive integer, got {num_frames!r}")
    if state is None:
        if noise is None:
            raise S2DiTError("stream needs a noise source or a stream state")
        state = new_stream_state(model, noise, sampler.guided, context, neg_context)
    velocity = _Velocity(model, context, neg_context, sampler, per_expert_guidance)
    height, width = latent_size
    batch = context.shape[0]
    timesteps = sampler.timesteps() if sampler.name == FEW_STEP else None
    warm = False  # whether the caches hold this call's text side (computed by its first pass)
    while state.frames < num_frames:
        start = time.perf_counter()
        frames = min(args.frames_per_chunk, num_frames - state.frames)
        shape = (batch, frames, height, width, args.in_dim)
        cache, neg_cache = state.cache, state.neg_cache
        passes = sampler.passes_per_chunk() - 1  # the denoising passes
        if state.pending is not None:  # the previous chunk's clean pass, deferred until needed
            velocity.write(state.pending.astype(dtype), cache, neg_cache)
            state.pending = None
            passes += 1
        x = state.noise.draw(shape).astype(dtype)
        step = velocity
        if compile and warm and _compilable(model):
            step = _CompiledChunk(velocity, [c for c in (cache, neg_cache) if c is not None])
        if timesteps is None:
            solver = sampler.solver()
            for i, t in enumerate(solver.timesteps):
                v = step(x, float(t), cache, neg_cache)
                x_t = x
                x = solver.step(v, x).astype(dtype)
                mx.eval(x)
                if on_step is not None:
                    x0 = (x_t - float(solver.sigmas[i]) * v).astype(dtype)
                    on_step(StepInfo(state.chunk, i, float(t), x_t, x0))
            x0 = x
        else:
            for i, t in enumerate(timesteps):
                v = step(x, t, cache, neg_cache)
                x0 = (x.astype(mx.float32) - (t / 1000.0) * v.astype(mx.float32)).astype(dtype)
                x_t = x
                if i + 1 < len(timesteps):
                    s_next = timesteps[i + 1] / 1000.0
                    noise = state.noise.draw(shape).astype(dtype)
                    x = ((1.0 - s_next) * x0 + s_next * noise).astype(dtype)
                mx.eval(x, x0)
                if on_step is not None:
                    on_step(StepInfo(state.chunk, i, float(t), x_t, x0))
        state.pending = x0
        mx.eval(state.arrays())
        result = ChunkResult(
            index=state.chunk,
            start_frame=state.frames,
            latents=x0,
            seconds=time.perf_counter() - start,
            passes=passes,
        )
        state.chunk += 1
        state.frames += frames
        warm = True
        yield result
