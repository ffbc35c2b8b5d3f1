"""Gradient checkpointing per module instance, without editing the model's code.

mlx-lm patches the layer *class*, which would also change every other model of that class
(inference included). Here each chosen instance gets a one-off subclass whose __call__ runs
the original through mx.checkpoint: activations inside the block are recomputed in the
backward pass instead of kept. Parameter names are untouched (the instance stays where it
is), so weights, checkpoints and adapters are unaffected.
"""

from __future__ import annotations

from collections.abc import Iterable

import mlx.core as mx
import mlx.nn as nn

_CACHE: dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    if getattr(cls, "_grad_checkpointed_base", None) is not None:
        return cls
    if cls in _CACHE:
        return _CACHE[cls]
    base_call = cls.__call__

    def __call__(self, *args, **kwargs):
        # Arrays go through mx.checkpoint; everything else (layouts, caches) is closed over.
        where = [i for i, a in enumerate(args) if isinstance(a, mx.array)]

        def inner(params, *arrays):
            self.update(params)
            full = list(args)
            for i, a in zip(where, arrays, strict=True):
                full[i] = a
            return base_call(self, *full, **kwargs)

        return mx.checkpoint(inner)(self.trainable_parameters(), *[args[i] for i in where])

    sub = type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__})
    sub._grad_checkpointed_base = cls
    _CACHE[cls] = sub
    return sub


def enable_grad_checkpoint(modules: Iterable[nn.Module]) -> None:
    """Recompute each module's activations in the backward pass (e.g. every DiT block)."""
    for m in modules:
        m.__class__ = _checkpointed_class(type(m))


def disable_grad_checkpoint(modules: Iterable[nn.Module]) -> None:
    """Undo enable_grad_checkpoint."""
    for m in modules:
        base = getattr(type(m), "_grad_checkpointed_base", None)
        if base is not None:
            m.__class__ = base


def is_grad_checkpointed(module: nn.Module) -> bool:
    """Whether enable_grad_checkpoint was applied to this instance."""
    return getattr(type(module), "_grad_checkpointed_base", None) is not None
