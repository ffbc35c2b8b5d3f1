"""The registry of self-attention kinds: everything the library needs to know about one kind.

A kind is one file (see full.py, lcha.py, ssa.py) that defines its module and calls
`register_attention(AttentionKind(...))`. The model builds its blocks from the registry, the
streaming generator asks it for each layer's cache, the cost model for FLOPs and state bytes,
the Core ML exporter for states and the MIL emitter, the pipeline for size constraints. Adding a
kind touches no other file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import S2DiTError


@dataclass(frozen=True)
class CallShape:
    """What one streaming call of a layer works on (token counts, after the patch embedding)."""

    frames: int  # latent frames of the chunk
    height: int  # token grid height
    width: int  # token grid width
    past_chunks: int  # kept earlier chunks a softmax layer attends to (steady state)
    text_len: int

    @property
    def tokens(self) -> int:
        """Tokens of the chunk."""
        return self.frames * self.height * self.width


@dataclass(frozen=True)
class AttentionKind:
    """One self-attention kind and every view of it the library uses.

    - `module(args)`: the nn.Module (called as module(x [B, N, dim], layout: TokenLayout));
    - `make_cache(args)`: a fresh streaming state for one layer (cache.Cache);
    - `spatial_stride(args)`: token height and width must be multiples of this
      (`spatial_reason` names it in messages, e.g. "SSA stride 2");
    - `flops(args, shape)`: FLOPs (2 per multiply-add) of the layer's self-attention in one
      streaming call, its q/k/v/o projections included (elementwise work left out);
    - `coreml_states(args, shape, layer)`: the fp16 Core ML states (coreml.shapes.StateSpec)
      of one layer, which also gives its state bytes;
    - `emit_coreml(ctx, args, layer, x, grid, shapes)`: the MIL emitter (coreml/emit.py passes
      its context; None: not exportable).
    """

    name: str
    module: Callable[[Any], Any]
    make_cache: Callable[[Any], Any]
    flops: Callable[[Any, CallShape], int]
    coreml_states: Callable[[Any, CallShape, int], list] = field(default=lambda a, s, i: [])
    emit_coreml: Callable[..., Any] | None = None
    spatial_stride: Callable[[Any], int] = field(default=lambda args: 1)
    spatial_reason: Callable[[Any], str] = field(default=lambda args: "")
    softmax: bool = False  # keeps a window of key/value chunks (window and sink apply)


_KINDS: dict[str, AttentionKind] = {}


def register_attention(kind: AttentionKind) -> AttentionKind:
    """Add (or replace) an attention kind; returns it."""
    _KINDS[kind.name] = kind
    return kind


def unregister_attention(name: str) -> None:
    """Remove a kind (tests register temporary ones)."""
    _KINDS.pop(name, None)


def attention_kind(name: str) -> AttentionKind:
    """The registered kind called `name`; S2DiTError naming the known ones otherwise."""
    try:
        return _KINDS[name]
    except (KeyError, TypeError):
        raise S2DiTError(
            f"unknown block type {name!r} in layers (known: {', '.join(attention_kinds())})"
        ) from None


def attention_kinds() -> list[str]:
    """Names of every registered kind, in registration order."""
    return list(_KINDS)
