"""Palette-aware training: the DiT trains through its own k-means weight palette.

Core ML's 6-bit palettisation (`s2dit export coreml --compress palette6`) replaces every
large linear/conv weight by 2^6 shared values found by 1-D k-means. A model trained in full
precision can lose a lot to that rounding. Fine-tuning with `--palette-bits N` makes the forward
pass use the palettised weights while the gradient updates the full-precision ones (a
straight-through estimator, as in quantisation-aware training), and the saved model holds the
snapped weights: at most 2^N distinct values per tensor, which the export's k-means then
recovers exactly, so the compressed package computes what the saved model does.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

# The export palettises weights of at least this many elements (coreml.export.compress).
MIN_SIZE = 2048
PALETTE_BITS = range(1, 9)  # Core ML palettes hold 2..256 values
LLOYD_ITERS = 16
HIST_BINS = 4096
CHUNK_ELEMENTS = 1 << 24  # entries x centroids compared at once (64 MB in float32)


def palette_targets(module: nn.Module, min_size: int = MIN_SIZE) -> list[str]:
    """Names of the matrix/conv weights large enough for the export to palettise."""
    return [
        name
        for name, value in tree_flatten(module.parameters())
        if name.endswith("weight") and value.ndim >= 2 and value.size >= min_size
    ]


def _nearest(flat: mx.array, centroids: mx.array) -> mx.array:
    """Index of the nearest centroid of every entry, in slices that bound the N x k temporary."""
    step = max(1, CHUNK_ELEMENTS // centroids.size)
    parts = [
        mx.argmin(mx.abs(flat[i : i + step, None] - centroids[None, :]), axis=1)
        for i in range(0, flat.size, step)
    ]
    return parts[0] if len(parts) == 1 else mx.concatenate(parts)


def kmeans_snap(w: mx.array, bits: int, iters: int = LLOYD_ITERS) -> mx.array:
    """`w` with every entry replaced by its nearest of 2**bits 1-D k-means centroids."""
    flat = w.reshape(-1).astype(mx.float32)
    k = 2**bits
    # Lloyd runs on a fine histogram (bin counts and sums), so an iteration costs bins x k,
    # not entries x k; only the final nearest-centroid assignment touches every entry.
    lo, hi = flat.min(), flat.max()
    width = mx.maximum((hi - lo) / HIST_BINS, 1e-12)
    bins = mx.clip(((flat - lo) / width).astype(mx.int32), 0, HIST_BINS - 1)
    counts = mx.zeros((HIST_BINS,)).at[bins].add(1.0)
    sums = mx.zeros((HIST_BINS,)).at[bins].add(flat)
    centres = lo + (mx.arange(HIST_BINS) + 0.5) * width
    means = mx.where(counts > 0, sums / mx.maximum(counts, 1.0), centres)
    # Quantile initialisation: deterministic and already close for bell-shaped weights.
    ranks = (mx.arange(k) + 0.5) * (flat.size / k)
    first = (mx.cumsum(counts)[None, :] < ranks[:, None]).sum(axis=1)
    centroids = means[mx.minimum(first, HIST_BINS - 1)]
    for _ in range(iters):
        nearest = mx.argmin(mx.abs(means[:, None] - centroids[None, :]), axis=1)
        mass = mx.zeros((k,)).at[nearest].add(counts)
        total = mx.zeros((k,)).at[nearest].add(sums)
        centroids = mx.where(mass > 0, total / mx.maximum(mass, 1.0), centroids)
    return centroids[_nearest(flat, centroids)].reshape(w.shape).astype(w.dtype)


def palette_aware_loss(
    loss_fn: Callable, bits: int, names: list[str], iters: int = LLOYD_ITERS
) -> Callable:
    """Wrap a flow loss so the DiT's `names` weights are palettised in the forward pass only."""

    def loss(model, batch, keys):
        dit = model.dit
        params = dict(tree_flatten(dit.parameters()))
        raw = [(n, params[n]) for n in names]
        # Straight-through: the value is the snapped weight, the gradient goes to the raw one.
        dit.update(
            tree_unflatten(
                [(n, w + mx.stop_gradient(kmeans_snap(w, bits, iters) - w)) for n, w in raw]
            )
        )
        try:
            return loss_fn(model, batch, keys)
        finally:
            dit.update(tree_unflatten(raw))  # the optimizer must update the raw weights

    return loss


def snap_weights(module: nn.Module, bits: int, names: list[str], iters: int = LLOYD_ITERS) -> None:
    """Replace the `names` weights of `module` by their palettised values, in place."""
    params = dict(tree_flatten(module.parameters()))
    snapped = [(n, kmeans_snap(params[n], bits, iters)) for n in names]
    mx.eval([w for _, w in snapped])
    module.update(tree_unflatten(snapped))
