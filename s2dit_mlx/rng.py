"""Counter-based randomness: every random draw is a pure function of (seed, counters).

Nothing random is carried from step to step, so a resumed run needs no pickled RNG state:
the noise of sample n is keyed by (seed, n) and the dropout stream of step s by (seed, s).
Keys are built with splitmix64, a small integer hash, and handed to MLX as threefry keys.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np

_MASK = (1 << 64) - 1

# Independent streams, so e.g. the noise of sample 3 is unrelated to the dropout of step 3.
STREAMS = {
    "noise": 0x6E6F697365,
    "dropout": 0x64726F70,
    "caption": 0x63617074,
    "background": 0x626B6772,
    "init": 0x696E6974,
    "crop-x": 0x63726F7078,
    "crop-y": 0x63726F7079,
    # distillation (train/dmd.py): rollout exits, DMD and critic noise levels
    "exit": 0x65786974,
    "dmd": 0x646D64,
    "critic": 0x637269746963,
}


def splitmix64(x: int) -> int:
    """One round of the splitmix64 finaliser (a bijective 64-bit integer hash)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def mix(*values: int) -> int:
    """Hash a tuple of non-negative integers into one 64-bit integer."""
    h = 0
    for v in values:
        h = splitmix64(h ^ (int(v) & _MASK))
    return h


def derive(seed: int, stream: str, *counters: int) -> int:
    """A 64-bit integer for (seed, stream, counters...)."""
    return mix(seed, STREAMS[stream], *counters)


def key(seed: int, stream: str, *counters: int) -> mx.array:
    """An MLX PRNG key (uint32[2]) for (seed, stream, counters...)."""
    h = derive(seed, stream, *counters)
    return mx.array([h >> 32, h & 0xFFFFFFFF], dtype=mx.uint32)


def sample_keys(seed: int, indices: Sequence[int], stream: str = "noise") -> mx.array:
    """Keys [n, 2] for global sample indices: a sample's noise does not depend on the batch split."""
    hs = [derive(seed, stream, i) for i in indices]
    return mx.array(np.array([[h >> 32, h & 0xFFFFFFFF] for h in hs], dtype=np.uint32))


def uniform01(seed: int, stream: str, *counters: int) -> float:
    """A float in [0, 1) for (seed, stream, counters...), computed on the host."""
    return (derive(seed, stream, *counters) >> 11) / float(1 << 53)


def step_seed(seed: int, step: int) -> int:
    """Seed for MLX's global generator at one step (used by dropout layers)."""
    return derive(seed, "dropout", step) & 0xFFFFFFFF
