"""Streaming state: the chunk schedule and the per-layer caches, the mlx-lm way.

Generation goes chunk by chunk (a few latent frames each). Every layer keeps a bounded state
between chunks, written once per chunk by the clean pass at t = 0 (`commit`) and read by every
denoising pass of the next chunk:

- softmax layers (`full`, `ssa`, ...): a `KVCache`, preallocated key/value buffers holding the
  `sink` first chunks and the `window - 1` most recent ones in fixed ring slots, plus one
  scratch slot for the chunk being denoised, all updated in place (no per-step concatenation);
- `lcha`: a `LinearAttentionCache`, the running sums S = sum phi(k) v^T and z = sum phi(k) and
  the last kt - 1 frames of its causal conv (a `ConvHistory`).

`ChunkSchedule` is the one statement of which chunks stay visible and in which slot each is
kept; the MLX caches, the Core ML emitter, the cost model and the manifest all use it.

Every cache has `state` (its arrays) and `meta_state` (small JSON-able facts), and
`Cache.from_state` rebuilds it, so a stream can be saved (`save_cache`), restored and branched
(`copy`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import mlx.core as mx

from .errors import S2DiTError


@dataclass(frozen=True)
class ChunkSchedule:
    """Which earlier chunks a query chunk sees, and the ring slot each kept chunk lives in.

    A query in chunk c sees the `sink` first chunks, the `window` most recent chunks (itself
    included) and nothing else; `window` None keeps every chunk. Kept chunks live in
    `past_slots = sink + window - 1` slots: sink chunk c in slot c, later chunks cycling through
    the `window - 1` recent slots. With that order, while chunk c is computed, slot s holds a
    visible chunk exactly when s < c, so a mask is one comparison.
    """

    window: int | None = None
    sink: int = 0

    def __post_init__(self):
        if self.window is not None and (isinstance(self.window, bool) or self.window < 1):
            raise S2DiTError(f"window must be at least 1 chunk (or null), got {self.window!r}")
        if isinstance(self.sink, bool) or self.sink < 0:
            raise S2DiTError(f"sink must be >= 0, got {self.sink!r}")

    @property
    def bounded(self) -> bool:
        """Whether the state stops growing (a window is set)."""
        return self.window is not None

    @property
    def recent_slots(self) -> int | None:
        """Ring slots for recent chunks (window - 1; None when unbounded)."""
        return None if self.window is None else self.window - 1

    @property
    def past_slots(self) -> int | None:
        """Slots of kept past chunks: sink + window - 1 (None when unbounded)."""
        return None if self.window is None else self.sink + self.window - 1

    def visible(self, chunk: int) -> list[int]:
        """Chunks a query in `chunk` attends to, in order (itself last)."""
        if self.window is None:
            return list(range(chunk + 1))
        recent = range(max(0, chunk - self.window + 1), chunk + 1)
        return sorted(set(range(min(self.sink, chunk + 1))) | set(recent))

    def slot(self, chunk: int) -> int | None:
        """The slot `chunk` is kept in once written (None: a window of 1 keeps no recent chunk)."""
        if self.window is None or chunk < self.sink:
            return chunk
        if self.recent_slots == 0:
            return None
        return self.sink + (chunk - self.sink) % self.recent_slots

    def scratch_slot(self, chunk: int) -> int:
        """Where the chunk being computed sits while it is denoised.

        Until the ring is full that is its own slot (nothing is there yet, so the used slots stay
        a prefix); afterwards one extra slot after the ring, since its own slot still holds a
        chunk it sees.
        """
        if self.window is None:
            return chunk
        return min(chunk, self.past_slots)

    def slots_in_use(self, chunk: int) -> int:
        """Slots a call for `chunk` reads, scratch included: always a prefix of the buffer."""
        return self.scratch_slot(chunk) + 1

    def mil_slot(self, mb, chunk):
        """The same slot arithmetic as `slot`, emitted as Core ML MIL int32 ops on `chunk` [1]."""
        import numpy as np

        if self.window is None or self.recent_slots == 0:
            raise S2DiTError("a static Core ML state needs a window of at least 2 chunks")
        past = mb.maximum(x=mb.sub(x=chunk, y=np.int32(self.sink)), y=np.int32(0))
        cycled = mb.add(x=mb.mod(x=past, y=np.int32(self.recent_slots)), y=np.int32(self.sink))
        return mb.minimum(x=chunk, y=cycled)

    def to_dict(self) -> dict:
        """JSON-ready description (for manifests and reports)."""
        return {
            "window": self.window,
            "sink": self.sink,
            "past_slots": self.past_slots,
            "slot_rule": "chunk c < sink: slot c; else sink + (c - sink) mod (window - 1)",
            "visible_rule": "slot s holds a visible chunk while chunk c is computed iff s < c",
        }


class Cache:
    """Streaming state of one layer. Subclasses set `state` arrays and `meta_state` facts."""

    @property
    def state(self) -> dict[str, mx.array]:
        """The arrays held (None entries are left out)."""
        raise NotImplementedError

    @state.setter
    def state(self, value: dict[str, mx.array]) -> None:
        raise NotImplementedError

    @property
    def meta_state(self) -> dict:
        """Small JSON-able facts needed to rebuild the cache (constructor args, counters)."""
        return {}

    @classmethod
    def from_state(cls, state: dict[str, mx.array], meta_state: dict) -> Cache:
        """A cache of this class holding `state`, as `state` / `meta_state` described it."""
        cache = cls(**cls._init_kwargs(meta_state))
        cache._restore_counters(meta_state)
        cache.state = state
        return cache

    @classmethod
    def _init_kwargs(cls, meta_state: dict) -> dict:
        return {}

    def _restore_counters(self, meta_state: dict) -> None:
        """Set what meta_state holds beyond the constructor arguments."""

    def arrays(self) -> list[mx.array]:
        """Every array held, for mx.eval."""
        return list(self.state.values())

    def nbytes(self) -> int:
        """Bytes held."""
        return sum(a.nbytes for a in self.arrays())

    def copy(self) -> Cache:
        """An independent cache in the same state (to branch a stream)."""
        # New array objects: in-place slice updates of one cache must not reach the other.
        state = {k: mx.array(v) for k, v in self.state.items()}
        return type(self).from_state(state, json.loads(json.dumps(self.meta_state)))


class KVCache(Cache):
    """Keys and values [B, H, L, D] of one softmax layer, preallocated and updated in place.

    Bounded (a window): `past_slots` ring slots plus one scratch slot, each `slot_tokens` long.
    Unbounded: one growing buffer; the chunk being computed sits right after the kept ones.
    `attend(k, v)` puts the current chunk's keys into its scratch slot and returns the keys and
    values it sees (a prefix of the buffer) with a mask only where a slot is partly filled;
    `commit(k, v)` keeps the chunk (in its ring slot) and moves on to the next chunk.
    """

    GROW = 4  # unbounded buffers grow by at least this many chunks at a time

    def __init__(self, schedule: ChunkSchedule):
        self.schedule = schedule
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.slot_tokens = 0  # tokens per slot (the longest chunk seen)
        self.lengths: list[int] = []  # valid tokens per slot
        self.written = 0  # chunks committed
        self._attended: mx.array | None = None  # the keys attend() last put in the scratch slot

    # -- layout

    def _capacity_slots(self, needed: int) -> int:
        if self.schedule.bounded:
            return self.schedule.past_slots + 1
        return max(needed, len(self.lengths) + self.GROW)

    def _ensure(self, k: mx.array, chunk_tokens: int) -> None:
        """Allocate, grow or widen the buffers so the current chunk fits its scratch slot."""
        scratch = self.schedule.scratch_slot(self.written)
        slots = len(self.lengths)
        if self.keys is not None and chunk_tokens <= self.slot_tokens and scratch < slots:
            return
        slot_tokens = max(self.slot_tokens, chunk_tokens)
        capacity = self._capacity_slots(scratch + 1) if scratch >= slots else slots
        b, h, _, d = k.shape
        keys = mx.zeros((b, h, capacity * slot_tokens, d), dtype=k.dtype)
        values = mx.zeros((b, h, capacity * slot_tokens, d), dtype=k.dtype)
        for s, n in enumerate(self.lengths):  # copy the kept chunks into the new layout
            if n:
                old = slice(s * self.slot_tokens, s * self.slot_tokens + n)
                new = slice(s * slot_tokens, s * slot_tokens + n)
                keys[:, :, new] = self.keys[:, :, old]
                values[:, :, new] = self.values[:, :, old]
        self.keys, self.values = keys, values
        self.lengths = self.lengths + [0] * (capacity - slots)
        self.slot_tokens = slot_tokens

    def _put(self, slot: int, k: mx.array, v: mx.array) -> None:
        start = slot * self.slot_tokens
        self.keys[:, :, start : start + k.shape[2]] = k.astype(self.keys.dtype)
        self.values[:, :, start : start + v.shape[2]] = v.astype(self.values.dtype)

    # -- the streaming calls

    def attend(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array, mx.array | None]:
        """Keys, values and mask (None: all valid) that the chunk being computed attends to."""
        n = k.shape[2]
        self._ensure(k, n)
        scratch = self.schedule.scratch_slot(self.written)
        self._put(scratch, k, v)
        self._attended = k
        used = scratch * self.slot_tokens + n
        keys, values = self.keys[:, :, :used], self.values[:, :, :used]
        partial = [s for s in range(scratch) if self.lengths[s] < self.slot_tokens]
        if not partial:
            return keys, values, None
        valid = mx.ones((used,), dtype=mx.bool_)
        for s in partial:  # a short chunk kept earlier: hide the unfilled end of its slot
            start = s * self.slot_tokens + self.lengths[s]
            valid[start : (s + 1) * self.slot_tokens] = False
        return keys, values, valid

    def commit(self, k: mx.array, v: mx.array) -> None:
        """Keep the clean chunk (the scratch copy when it already sits in its own slot)."""
        n = k.shape[2]
        self._ensure(k, n)
        chunk = self.written
        slot = self.schedule.slot(chunk)
        if slot is not None:
            # While the ring fills, attend() already put these keys into their own slot.
            if not (k is self._attended and slot == self.schedule.scratch_slot(chunk)):
                self._put(slot, k, v)
            self.lengths[slot] = n
        self._attended = None
        self.written += 1

    # -- state

    @property
    def state(self) -> dict[str, mx.array]:
        if self.keys is None:
            return {}
        return {"keys": self.keys, "values": self.values}

    @state.setter
    def state(self, value: dict[str, mx.array]) -> None:
        self.keys, self.values = value.get("keys"), value.get("values")

    @property
    def meta_state(self) -> dict:
        return {
            "window": self.schedule.window,
            "sink": self.schedule.sink,
            "slot_tokens": self.slot_tokens,
            "lengths": list(self.lengths),
            "written": self.written,
        }

    def _restore_counters(self, meta_state: dict) -> None:
        self.slot_tokens = int(meta_state["slot_tokens"])
        self.lengths = [int(n) for n in meta_state["lengths"]]
        self.written = int(meta_state["written"])

    @classmethod
    def _init_kwargs(cls, meta_state: dict) -> dict:
        return {"schedule": ChunkSchedule(meta_state["window"], meta_state["sink"])}

    def arrays(self) -> list[mx.array]:
        return list(self.state.values())


class ConvHistory(Cache):
    """The last `frames` input frames [B, frames, ...] of a causal convolution along axis 1.

    `prepend(x)` gives the history followed by x (zeros before the first frame), the input a
    causal conv needs for x; `update(padded)` keeps the last frames of it.
    """

    def __init__(self, frames: int):
        self.frames = frames
        self.history: mx.array | None = None

    def prepend(self, x: mx.array) -> mx.array:
        """[history, x] along the time axis (axis 1)."""
        if self.frames == 0:
            return x
        past = self.history
        if past is None:
            past = mx.zeros((x.shape[0], self.frames, *x.shape[2:]), dtype=x.dtype)
        return mx.concatenate([past.astype(x.dtype), x], axis=1)

    def update(self, padded: mx.array) -> None:
        """Keep the last `frames` frames of a (history-prepended) input.

        A copy, so the history does not pin the whole input it was cut from.
        """
        if self.frames:
            self.history = mx.contiguous(padded[:, padded.shape[1] - self.frames :])

    @property
    def state(self) -> dict[str, mx.array]:
        return {} if self.history is None else {"history": self.history}

    @state.setter
    def state(self, value: dict[str, mx.array]) -> None:
        self.history = value.get("history")

    @property
    def meta_state(self) -> dict:
        return {"frames": self.frames}

    @classmethod
    def _init_kwargs(cls, meta_state: dict) -> dict:
        return {"frames": int(meta_state["frames"])}


class ConvHistories(Cache):
    """The ConvHistory of every causal conv of a network (a VAE decoder's feature cache).

    Each conv asks for its own with `of(module, frames)`; histories are kept in the order the
    convs first asked, which is fixed by the network, so a saved state restores by position.
    """

    def __init__(self):
        self.histories: dict[int, ConvHistory] = {}
        self._restored: list[ConvHistory] = []

    def of(self, module, frames: int) -> ConvHistory:
        """The history of `module` (created empty on its first call)."""
        key = id(module)
        if key not in self.histories:
            position = len(self.histories)
            restored = self._restored[position] if position < len(self._restored) else None
            self.histories[key] = restored or ConvHistory(frames)
        return self.histories[key]

    @property
    def state(self) -> dict[str, mx.array]:
        return {
            f"{i}": h.history
            for i, h in enumerate(self.histories.values())
            if h.history is not None
        }

    @state.setter
    def state(self, value: dict[str, mx.array]) -> None:
        for i, h in enumerate(self._restored):
            h.history = value.get(f"{i}")

    @property
    def meta_state(self) -> dict:
        return {"frames": [h.frames for h in self.histories.values()]}

    def _restore_counters(self, meta_state: dict) -> None:
        self._restored = [ConvHistory(int(f)) for f in meta_state["frames"]]


class LinearAttentionCache(Cache):
    """LCHA state: S = sum phi(k) v^T [B, H, F, D], z = sum phi(k) [B, H, F], conv history."""

    def __init__(self, conv_frames: int):
        self.kv: mx.array | None = None
        self.k_sum: mx.array | None = None
        self.conv = ConvHistory(conv_frames)

    def commit(self, kv: mx.array, k_sum: mx.array, conv_input: mx.array) -> None:
        """Add a clean chunk's sums and keep the last frames of its (history-prepended) conv input."""
        self.kv = kv if self.kv is None else self.kv + kv
        self.k_sum = k_sum if self.k_sum is None else self.k_sum + k_sum
        self.conv.update(conv_input)

    @property
    def state(self) -> dict[str, mx.array]:
        held = {"kv": self.kv, "k_sum": self.k_sum, "conv": self.conv.history}
        return {k: v for k, v in held.items() if v is not None}

    @state.setter
    def state(self, value: dict[str, mx.array]) -> None:
        self.kv, self.k_sum = value.get("kv"), value.get("k_sum")
        self.conv.history = value.get("conv")

    @property
    def meta_state(self) -> dict:
        return {"conv_frames": self.conv.frames}

    @classmethod
    def _init_kwargs(cls, meta_state: dict) -> dict:
        return {"conv_frames": int(meta_state["conv_frames"])}


CACHE_TYPES: dict[str, type[Cache]] = {
    c.__name__: c for c in (KVCache, ConvHistory, ConvHistories, LinearAttentionCache)
}


def register_cache_type(cls: type[Cache]) -> type[Cache]:
    """Make a Cache subclass restorable by `load_cache` (usable as a class decorator)."""
    CACHE_TYPES[cls.__name__] = cls
    return cls


class TextCache:
    """The text side of a stream: the embedded context and every block's cross-attention keys
    and values, computed once per context (the prompt does not change within a stream) and
    reused by every denoising and writing pass. Keyed by the context array's identity; never
    saved or copied (it is recomputed from the context in one pass)."""

    def __init__(self):
        self.source: mx.array | None = None
        self.embedded: mx.array | None = None
        self.keys_values: dict[int, tuple[mx.array, mx.array]] = {}

    def embed(self, context: mx.array, embed) -> mx.array:
        """`embed(context)`, computed once for this context."""
        if context is not self.source:
            self.source, self.embedded, self.keys_values = context, embed(context), {}
        return self.embedded

    def cross(self, layer: int, compute) -> tuple[mx.array, mx.array]:
        """Layer `layer`'s cross-attention keys and values, computed once for this context."""
        if layer not in self.keys_values:
            self.keys_values[layer] = compute()
        return self.keys_values[layer]


class StreamCache:
    """The caches of every layer of a model, plus the latent frames written so far.

    `frames` is the frame offset of the next chunk (its RoPE position); `text` the TextCache.
    """

    def __init__(self, layers: list[Cache], frames: int = 0):
        self.layers = list(layers)
        self.frames = frames
        self.text = TextCache()

    def arrays(self) -> list[mx.array]:
        """Every array held by every layer."""
        return [a for layer in self.layers for a in layer.arrays()]

    def nbytes(self) -> int:
        """Bytes held by the state."""
        return sum(a.nbytes for a in self.arrays())

    def detach(self) -> None:
        """Stop gradients at the state (training: later chunks do not train earlier writes)."""
        for layer in self.layers:
            layer.state = {k: mx.stop_gradient(v) for k, v in layer.state.items()}

    def copy(self) -> StreamCache:
        """An independent copy (branch a stream)."""
        return StreamCache([layer.copy() for layer in self.layers], self.frames)

    @property
    def state(self) -> dict[str, mx.array]:
        """Flat `layer.N.name -> array` dict."""
        return {
            f"layer.{i}.{name}": a
            for i, layer in enumerate(self.layers)
            for name, a in layer.state.items()
        }

    @property
    def meta_state(self) -> dict:
        """Per-layer class and facts, and the frame offset."""
        return {
            "frames": self.frames,
            "layers": [
                {"type": type(layer).__name__, "meta": layer.meta_state} for layer in self.layers
            ],
        }

    @classmethod
    def from_state(cls, state: dict[str, mx.array], meta_state: dict) -> StreamCache:
        """Rebuild what `state` / `meta_state` described."""
        layers = []
        for i, entry in enumerate(meta_state["layers"]):
            kind = CACHE_TYPES.get(entry["type"])
            if kind is None:
                raise S2DiTError(f"unknown cache type {entry['type']!r} in layer {i}")
            prefix = f"layer.{i}."
            arrays = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            layers.append(kind.from_state(arrays, entry["meta"]))
        return cls(layers, int(meta_state["frames"]))


class CacheGroup:
    """Named StreamCaches of a model made of several DiTs (Wan2.2 A14B's two experts)."""

    def __init__(self, parts: dict[str, StreamCache]):
        self.parts = dict(parts)

    def __getitem__(self, name: str) -> StreamCache:
        return self.parts[name]

    @property
    def frames(self) -> int:
        """Latent frames written (the same in every part)."""
        return max(part.frames for part in self.parts.values())

    def arrays(self) -> list[mx.array]:
        """Every array of every part."""
        return [a for part in self.parts.values() for a in part.arrays()]

    def nbytes(self) -> int:
        """Bytes held by every part."""
        return sum(part.nbytes() for part in self.parts.values())

    def detach(self) -> None:
        """Stop gradients at every part's state."""
        for part in self.parts.values():
            part.detach()

    def copy(self) -> CacheGroup:
        """An independent copy."""
        return CacheGroup({name: part.copy() for name, part in self.parts.items()})


def _flatten(caches: dict) -> dict[str, StreamCache]:
    flat = {}
    for name, cache in caches.items():
        if isinstance(cache, CacheGroup):
            flat.update({f"{name}:{part}": c for part, c in cache.parts.items()})
        else:
            flat[name] = cache
    return flat


def _unflatten(flat: dict[str, StreamCache]) -> dict:
    caches: dict = {}
    for key, cache in flat.items():
        name, _, part = key.partition(":")
        if part:
            caches.setdefault(name, CacheGroup({})).parts[part] = cache
        else:
            caches[name] = cache
    return caches


def save_cache(
    path: str | os.PathLike,
    caches: dict[str, StreamCache | CacheGroup],
    arrays: dict[str, mx.array] | None = None,
    extra: dict | None = None,
) -> None:
    """Write named stream caches, other arrays and JSON facts to one safetensors file, atomically."""
    path = os.fspath(path)
    caches = _flatten(caches)
    tensors = {f"{name}/{k}": a for name, cache in caches.items() for k, a in cache.state.items()}
    tensors.update({f"arrays/{k}": a for k, a in (arrays or {}).items()})
    meta = {
        "format": "s2dit-stream",
        "caches": json.dumps({name: c.meta_state for name, c in caches.items()}),
        "extra": json.dumps(extra or {}),
    }
    mx.eval(list(tensors.values()))
    tmp = f"{path}.tmp{os.getpid()}.safetensors"
    try:
        mx.save_safetensors(tmp, tensors, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_cache(path: str | os.PathLike) -> tuple[dict, dict[str, mx.array], dict]:
    """Read what `save_cache` wrote: (named caches, other arrays, extra facts)."""
    try:
        tensors, meta = mx.load(os.fspath(path), return_metadata=True)
        if meta.get("format") != "s2dit-stream":
            raise ValueError("no s2dit-stream format tag")
        caches = {}
        for name, cache_meta in json.loads(meta["caches"]).items():
            prefix = f"{name}/"
            state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            caches[name] = StreamCache.from_state(state, cache_meta)
        arrays = {k[len("arrays/") :]: v for k, v in tensors.items() if k.startswith("arrays/")}
        return _unflatten(caches), arrays, json.loads(meta.get("extra", "{}"))
    except (KeyError, ValueError, RuntimeError, OSError) as err:
        raise S2DiTError(f"{path} is not a saved stream ({' '.join(str(err).split())})") from None
