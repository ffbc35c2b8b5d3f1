"""Self-attention kinds of the S2DiT sandwich, one file each, found through one registry.

Built in: `full` (Wan's softmax attention), `lcha` (LinConv Hybrid Attention) and `ssa`
(Stride Self-Attention). A new kind is one file defining its module and calling
`register_attention(AttentionKind(...))` (see registry.py for what an entry holds).
"""

# The built-in kinds register themselves on import.
from . import full, lcha, ssa  # noqa: F401
from .common import TokenLayout
from .registry import (
    AttentionKind,
    CallShape,
    attention_kind,
    attention_kinds,
    register_attention,
    unregister_attention,
)

__all__ = [
    "AttentionKind",
    "CallShape",
    "TokenLayout",
    "attention_kind",
    "attention_kinds",
    "register_attention",
    "unregister_attention",
]
