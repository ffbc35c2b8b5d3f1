"""The chunk-by-chunk streaming generator (the per-layer caches live in cache.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import mlx.core as mx

from .errors import S2DiTError
from .sampling import FlowEulerSolver, FlowUniPCSolver


def stream_latent_chunks(
    model,
    context: mx.array,
    *,
    num_latent_frames: int,
    latent_height: int,
    latent_width: int,
    seed: int,
    timesteps: list[float] | None = None,
    solver: Callable[[], FlowEulerSolver | FlowUniPCSolver] | None = None,
    neg_context: mx.array | None = None,
    guidance: float = 1.0,
    dtype: mx.Dtype = mx.float32,
) -> Iterator[mx.array]:
    """Generate clean latent chunks [B, f, h, w, C] one at a time with a bounded cache.

    Each chunk starts from noise and is denoised given the clean chunks already in the cache,
    in one of two ways:
    - `timesteps` (the few-step sampler of distilled students): at every t the model predicts
      x0, which is re-noised with fresh noise to the next t; the last x0 is the chunk;
    - `solver`, a factory of fresh sampling solvers (sampling.make_solver): that ODE solver
      integrates the chunk over its own schedule (the sampler of undistilled models, whose x0
      prediction is a posterior mean that re-noising would blur).
    A final pass at t=0 over the clean chunk writes it into the state, so later chunks see it.
    """
    if (timesteps is None) == (solver is None):
        raise S2DiTError("give either the few-step timesteps or an ODE solver factory")
    args = model.args
    use_cfg = guidance != 1.0 and neg_context is not None
    # Guidance runs the two prompts as one doubled batch with one cache (half the dispatches of
    # two passes; the model is per-sample, so this equals two caches); unequal shapes cannot stack.
    batched_cfg = use_cfg and neg_context.shape == context.shape
    batch = context.shape[0]
    if batched_cfg:
        context = mx.concatenate([context, neg_context.astype(context.dtype)])
    copies = 2 if batched_cfg else 1

    def stacked(a: mx.array) -> mx.array:
        return mx.concatenate([a] * copies) if copies > 1 else a

    cache = model.make_cache()
    neg_cache = model.make_cache() if use_cfg and not batched_cfg else None

    def velocity(x: mx.array, t: float) -> mx.array:
        """The (guided) velocity of the current chunk at noise level t, caches read only."""
        t_vec = mx.full((copies * batch,), t, dtype=mx.float32)
        v = model(stacked(x), t_vec, context, cache=cache)
        if batched_cfg:
            v, v_neg = v[:batch], v[batch:]
        elif use_cfg:
            v_neg = model(x, t_vec, neg_context, cache=neg_cache)
        return v_neg + guidance * (v - v_neg) if use_cfg else v

    key = mx.random.key(seed)
    done = 0
    while done < num_latent_frames:
        frames = min(args.frames_per_chunk, num_latent_frames - done)
        shape = (batch, frames, latent_height, latent_width, args.in_dim)
        key, sub = mx.random.split(key)
        x = mx.random.normal(shape, key=sub).astype(dtype)
        if solver is not None:
            ode = solver()
            for t in ode.timesteps:
                x = ode.step(velocity(x, float(t)), x).astype(dtype)
                mx.eval(x)
            x0 = x
        else:
            for i, t in enumerate(timesteps):
                sigma = t / 1000.0
                x0 = (x.astype(mx.float32) - sigma * velocity(x, t).astype(mx.float32)).astype(
                    dtype
                )
                if i + 1 < len(timesteps):
                    key, sub = mx.random.split(key)
                    s_next = timesteps[i + 1] / 1000.0
                    noise = mx.random.normal(shape, key=sub).astype(dtype)
                    x = ((1.0 - s_next) * x0 + s_next * noise).astype(dtype)
                mx.eval(x, x0)
        zero = mx.zeros((copies * batch,), dtype=mx.float32)
        model(stacked(x0), zero, context, cache=cache, update_cache=True)
        if neg_cache is not None:
            model(x0, zero, neg_context, cache=neg_cache, update_cache=True)
        mx.eval(cache.arrays(), neg_cache.arrays() if neg_cache is not None else [])
        done += frames
        yield x0
