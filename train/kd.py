"""Knowledge distillation from a teacher cache (S2DiT-KD): the data source and the ODE loss.

- many-step KD: the student learns the teacher's clean outputs x0 with the streaming flow loss
  (train/flow.py); `cache_source` hands the cached x0 and text context to the trainer;
- few-step initialisation (causal ODE regression): at each of the student's few-step points
  the student maps the teacher's own state x_t to the teacher's x0, chunk by chunk through the
  streaming cache, each chunk after the teacher's clean earlier chunks (teacher forcing, as the
  student will see its own clean chunks when it streams). The cached trajectories must come
  from a causal (streaming) teacher: ODE pairs from a bidirectional one make an AR student
  flicker between chunks.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from s2dit_mlx import rng
from s2dit_mlx.errors import S2DiTError

from .teacher_cache import TeacherCache


def cache_source(path: str, seed: int = 0, **_ignored):
    """A data source over a teacher cache: sample n is cache entry perm_e(n mod N), epoch e."""
    cache = TeacherCache(path)
    size = len(cache)

    def source(indices: Sequence[int]) -> dict:
        picks = []
        for n in indices:
            epoch, pos = divmod(int(n), size)
            order = np.random.default_rng(rng.derive(seed, "noise", epoch) & 0xFFFFFFFF)
            picks.append(int(order.permutation(size)[pos]))
        batch = cache.samples(picks)
        return {
            "latents": batch["x0"],
            "context": batch["context"],
            "states": batch["states"],
        }

    source.cache = cache  # the trainer's callers read the spec (grid, shapes) from here
    return source


def ode_regression_loss(
    model, batch: dict, keys: mx.array, positions: list[int], cache_spec
) -> mx.array:
    """Mean squared error of the student's x0 at the teacher's states, chunk by chunk.

    batch: "states" [B, K, T, h, w, C] (the cache's kept steps), "latents" (teacher x0),
    "context". `positions`: the kept steps the student samples at; each chunk of each sample
    takes one of them at random (from its key).
    """
    dit = model.dit
    states, x0 = batch["states"], batch["latents"]
    context = model.context(batch)
    b, _, frames = states.shape[:3]
    f = dit.args.frames_per_chunk
    n_chunks = -(-frames // f)
    # The student is called at its own points, t = 1000 sigma (not the teacher's int-truncated t).
    kept_s = mx.array([cache_spec.sigmas[i] for i in cache_spec.keep], dtype=mx.float32)
    kept_t = 1000.0 * kept_s
    choices = mx.array(positions)
    draws = mx.vmap(lambda k: mx.random.randint(0, len(positions), (n_chunks,), key=k))(keys)
    picked = choices[draws]  # [B, chunks]: kept-step position per chunk
    cache = dit.make_cache()
    total = mx.array(0.0)
    for c in range(n_chunks):
        a, z = c * f, min((c + 1) * f, frames)
        pos = picked[:, c]
        x_t = mx.take_along_axis(states[:, :, a:z], pos.reshape(b, 1, 1, 1, 1, 1), axis=1)[:, 0]
        t, s = kept_t[pos], kept_s[pos]
        v = dit(x_t, t, context, cache=cache)
        pred = x_t.astype(mx.float32) - s.reshape(b, 1, 1, 1, 1) * v.astype(mx.float32)
        total = total + ((pred - x0[:, a:z].astype(mx.float32)) ** 2).mean() * (z - a)
        dit(x0[:, a:z], mx.zeros((b,)), context, cache=cache, update_cache=True)
        cache.detach()
    return total / frames


def make_ode_loss(positions: list[int], cache_spec):
    """loss_fn(model, batch, keys) for the Trainer."""
    if not positions:
        raise S2DiTError("ODE regression needs at least one student timestep")

    def loss_fn(model, batch: dict, keys: mx.array) -> mx.array:
        return ode_regression_loss(model, batch, keys, positions, cache_spec)

    return loss_fn
