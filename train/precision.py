"""Float32 master weights for training half-precision models, and the non-finite checks.

A model folder may store float16 or bfloat16 weights (the built-in model is float16, half the
size). AdamW cannot run in float16: its eps (1e-8) rounds to 0 there and small squared
gradients underflow to 0, so a weight with a zero gradient gets 0 / 0 = NaN on the first
update. The trainer therefore trains float32 copies of the trainable weights (the masters),
so the optimizer state and the EMA are float32 too, and casts them back to each weight's own
dtype only when it writes a model folder.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from s2dit_mlx.errors import S2DiTError

HALF_DTYPES = (mx.float16, mx.bfloat16)
MASTER_DTYPE = mx.float32


class NonFiniteError(S2DiTError):
    """Training met a NaN or an infinity (loss, gradient or weights); nothing bad was saved."""


def use_float32_masters(model: nn.Module) -> dict[str, mx.Dtype]:
    """Cast the model's half-precision trainable weights to float32, in place.

    Returns the original dtype of every trainable weight (by tree_flatten name).
    """
    params = tree_flatten(model.trainable_parameters())
    dtypes = {name: value.dtype for name, value in params}
    upcast = [(name, v.astype(MASTER_DTYPE)) for name, v in params if v.dtype in HALF_DTYPES]
    if upcast:
        model.load_weights(upcast, strict=False)
        mx.eval([v for _, v in upcast])
    return dtypes


def cast_like(arrays: dict[str, mx.array], like: dict[str, mx.array]) -> dict[str, mx.array]:
    """`arrays` with every entry cast to the dtype of the same-named entry of `like`."""
    return {
        name: v if name not in like or v.dtype == like[name].dtype else v.astype(like[name].dtype)
        for name, v in arrays.items()
    }


def nonfinite_names(arrays: dict[str, mx.array]) -> list[str]:
    """Names of the floating-point arrays that hold a NaN or an infinity (one evaluation)."""
    names = [k for k, v in arrays.items() if mx.issubdtype(v.dtype, mx.inexact) and v.size]
    if not names:
        return []
    finite = mx.stack([mx.isfinite(arrays[k]).all() for k in names])
    return [k for k, ok in zip(names, finite.tolist(), strict=True) if not ok]
