"""Data sources for training: batches are a pure function of global sample indices.

A data source is any callable `source(indices: list[int]) -> dict` giving the samples with those
global indices, either

    {"latents": [B, T, h, w, C], "context": [B, L, D]}     already encoded, or
    {"video": [B, F, H, W, 3] in [-1, 1], "captions": [str] * B}   raw, encoded by a VideoEncoder.

The trainer asks for samples step * batch .. (step + 1) * batch - 1 (each process only its
slice), so the data order needs no saved iterator state: resuming at step s reads the same
samples an uninterrupted run would.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence

import mlx.core as mx
import numpy as np

from s2dit_mlx import rng
from s2dit_mlx.errors import S2DiTError

DataSource = Callable[[Sequence[int]], dict]


class VideoEncoder:
    """Turns {"video", "captions"} batches into what the flow loss needs.

    Videos go through the (frozen) VAE; captions through the frozen text encoder, or, when the
    text encoder is trained jointly, only through its tokenizer (the encoder then runs inside
    the loss). A caption is replaced by "" with probability `caption_dropout` (decided by
    seed and sample index), which teaches the unconditional branch used by CFG.
    """

    def __init__(
        self,
        vae,
        text_encoder,
        train_text_encoder: bool = False,
        caption_dropout: float = 0.0,
        seed: int = 0,
    ):
        self.vae = vae
        self.text_encoder = text_encoder
        self.train_text_encoder = train_text_encoder
        self.caption_dropout = caption_dropout
        self.seed = seed

    def __call__(self, batch: dict, indices: Sequence[int]) -> dict:
        """Encode one (local) batch; `indices` are its global sample indices."""
        if "latents" in batch:
            return batch
        video = (
            mx.array(batch["video"]) if isinstance(batch["video"], np.ndarray) else batch["video"]
        )
        latents = mx.stop_gradient(self.vae.encode(video.astype(mx.float32)))
        captions = list(batch["captions"])
        if self.caption_dropout > 0:
            captions = [
                "" if rng.uniform01(self.seed, "caption", i) < self.caption_dropout else c
                for c, i in zip(captions, indices, strict=True)
            ]
        if self.train_text_encoder:
            return {"latents": latents, **tokenize(self.text_encoder, captions)}
        context = mx.stop_gradient(self.text_encoder.encode(captions))
        return {"latents": latents, "context": context}


def load_source(spec: str, **options) -> DataSource:
    """A data source by name: "shapes" or "package.module:function" (called with **options).

    Raises S2DiTError (one line) when the module does not import, the name is not a function,
    the function fails or returns something that is not a source.
    """
    if spec == "shapes":
        return shapes_source(**options)
    if spec.startswith("cache:"):
        from .kd import cache_source

        return cache_source(spec[len("cache:") :], seed=options.get("seed", 0))
    if ":" not in spec:
        raise S2DiTError(f"unknown data source {spec!r}: use 'shapes' or 'package.module:function'")
    mod_name, fn_name = spec.split(":", 1)
    try:
        module = importlib.import_module(mod_name)
    except Exception as err:  # ImportError, or whatever importing the user's module raised
        raise S2DiTError(
            f"cannot load data source {spec!r} ({type(err).__name__}: {_one_line(err)})"
        ) from None
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise S2DiTError(f"cannot load data source {spec!r}: {mod_name} has no {fn_name!r}")
    if not callable(fn):
        raise S2DiTError(
            f"data source {spec!r} is not a function (it is of type {type(fn).__name__})"
        )
    try:
        accepted = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # some builtins have no signature
        accepted = {}
    if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        options = {k: v for k, v in options.items() if k in accepted}
    try:
        source = fn(**options)
    except Exception as err:  # the user's function: report it in one line
        raise S2DiTError(
            f"data source {spec!r} failed ({type(err).__name__}: {_one_line(err)})"
        ) from None
    if not callable(source):
        raise S2DiTError(
            f"data source {spec!r} returned an object of type {type(source).__name__}; it must "
            "return a function source(indices) -> dict"
        )
    return source


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def shapes_source(
    seed: int = 0, frames: int = 17, height: int = 64, width: int = 64, **_ignored
) -> DataSource:
    """The procedural moving-shapes clips of s2dit_mlx.world.shapes, by global sample index."""
    from s2dit_mlx.world.shapes import ShapesDataset

    dataset = ShapesDataset(height=height, width=width, frames=frames, seed=seed)

    def source(indices: Sequence[int]) -> dict:
        videos, captions = dataset.batch(list(indices))
        return {"video": mx.array(videos), "captions": captions}

    return source


def tokenize(text_encoder, captions: list[str]) -> dict:
    """Token arrays for a text encoder trained jointly (its forward then runs in the loss).

    Encoders with `tokenize(prompts) -> (ids, lengths)` (byte) give {"ids", "lengths"}; those with
    a `tokenizer(prompts) -> (ids, mask)` (umT5) give {"ids", "mask"}.
    """
    if hasattr(text_encoder, "tokenize"):
        ids, lengths = text_encoder.tokenize(captions)
        return {"ids": mx.array(ids), "lengths": mx.array(lengths)}
    tokenizer = getattr(text_encoder, "tokenizer", None)
    if callable(tokenizer):
        ids, mask = tokenizer(captions)
        return {"ids": mx.array(ids), "mask": mx.array(mask)}
    raise S2DiTError(
        f"cannot train {type(text_encoder).__name__} jointly: it has neither tokenize() "
        "nor a tokenizer"
    )


def global_indices(micro_step: int, batch_size: int) -> list[int]:
    """Global sample indices of one micro-batch (all processes together)."""
    return list(range(micro_step * batch_size, (micro_step + 1) * batch_size))


def local_slice(indices: list[int], rank: int, size: int) -> list[int]:
    """This process's contiguous share of a global batch."""
    if len(indices) % size:
        raise S2DiTError(
            f"batch size {len(indices)} must be divisible by the number of processes ({size})"
        )
    per = len(indices) // size
    return indices[rank * per : (rank + 1) * per]
