"""Static shapes of an exported streaming call and the Core ML states it carries.

Plain Python (no coremltools), so the attention kinds, the cost model and the manifest can
describe states without the exporter installed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..attention.registry import CallShape
from ..cache import ChunkSchedule


@dataclass
class StreamShapes:
    """Static shapes of one exported streaming call (chosen at export)."""

    frames: int  # latent frames per chunk
    latent_height: int
    latent_width: int
    window: int  # chunks of softmax keys visible, the current one included
    sink: int
    text_len: int

    @property
    def schedule(self) -> ChunkSchedule:
        """The window and sink as the one ChunkSchedule every part of the library uses."""
        return ChunkSchedule(self.window, self.sink)

    def grid(self, patch: tuple[int, int, int]) -> tuple[int, int, int]:
        """Token grid (frames, height, width) of one chunk."""
        return self.frames, self.latent_height // patch[1], self.latent_width // patch[2]

    @property
    def slots(self) -> int:
        """Past chunks a softmax layer keeps: the sinks plus window - 1 recent ones."""
        return self.schedule.past_slots

    def call_shape(self, patch: tuple[int, int, int]) -> CallShape:
        """The CallShape the attention kinds take."""
        frames, height, width = self.grid(patch)
        return CallShape(frames, height, width, self.slots, self.text_len)


@dataclass
class StateSpec:
    """One Core ML state: name, shape and which layer owns it."""

    name: str
    shape: tuple[int, ...]
    layer: int
    kind: str  # "keys", "values", "kv_mean", "k_mean", "conv_frames", "vae_history", ...
    dtype: str = "fp16"

    @property
    def nbytes(self) -> int:
        return 2 * math.prod(self.shape)

    def to_dict(self) -> dict:
        """JSON-ready description for the manifest."""
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "bytes": self.nbytes,
            "layer": self.layer,
            "kind": self.kind,
        }


def kv_state_specs(args, layer: int, tokens_per_chunk: int, past_chunks: int) -> list[StateSpec]:
    """The key and value ring buffers [1, H, past_chunks * tokens, D] of a softmax layer."""
    shape = (1, args.num_heads, past_chunks * tokens_per_chunk, args.head_dim)
    return [
        StateSpec(f"l{layer}_keys", shape, layer, "keys"),
        StateSpec(f"l{layer}_values", shape, layer, "values"),
    ]
