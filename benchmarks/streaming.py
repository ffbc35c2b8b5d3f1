"""Streaming over many chunks: time and peak memory per chunk, the caches of today vs before.

Writes benchmarks/results/streaming.json. A random-weight S2DiT at Wan-1.3B width (dim 1536,
12 heads, ffn 8960, text 512 x 4096), 4 layers (lcha, ssa, full, lcha), 60x104 latents (a
480x832 video), window 3 chunks with 1 sink, few-step sampling (4 steps + the writing pass per
chunk), streams 32 chunks twice, the two streams advanced in turns (chunk i of A, chunk i of B,
...), so a slow spell of the machine lands on both:

- "now": s2dit_mlx.cache as it is: preallocated key/value ring buffers updated in place, and the
  text side (embedded prompt, cross-attention keys and values) computed once per stream;
- "before": the caches as they were: each softmax layer keeps its chunks in a dict and
  concatenates the visible ones with the current chunk on every pass, and every pass embeds the
  prompt and projects the cross-attention keys and values again.

Both give the same latents (checked). Memory: mx.get_peak_memory() per chunk.
"""

from __future__ import annotations

import argparse
import platform
import statistics
from pathlib import Path

from s2dit_mlx import setup_blas

setup_blas()  # an entry point: OpenBLAS before mlx.core (s2dit_mlx/_blas.py)

# isort: split
import mlx.core as mx
import numpy as np
from results_io import write_result

from s2dit_mlx import kernels
from s2dit_mlx.attention import attention_kind
from s2dit_mlx.cache import Cache, ChunkSchedule, StreamCache
from s2dit_mlx.generation import Sampler, SeededNoise, stream
from s2dit_mlx.models.s2dit import ModelArgs, S2DiT


class ConcatKVCache(Cache):
    """The key/value cache before: chunks in a dict, concatenated with the current one per call."""

    def __init__(self, schedule: ChunkSchedule):
        self.schedule = schedule
        self.chunks: dict[int, tuple[mx.array, mx.array]] = {}
        self.written = 0

    def attend(self, k, v):
        past = [self.chunks[j] for j in self.schedule.visible(self.written)[:-1]]
        if not past:
            return k, v, None
        keys = mx.concatenate([p[0] for p in past] + [k], axis=2)
        values = mx.concatenate([p[1] for p in past] + [v], axis=2)
        return keys, values, None

    def commit(self, k, v):
        self.chunks[self.written] = (k, v)
        self.written += 1
        keep = set(self.schedule.visible(self.written))
        self.chunks = {j: kv for j, kv in self.chunks.items() if j in keep}

    @property
    def state(self):
        return {
            f"{j}.{n}": a for j, kv in self.chunks.items() for n, a in zip("kv", kv, strict=True)
        }


class NoTextCache:
    """Before: the prompt embedded and the cross-attention keys and values projected per pass."""

    def embed(self, context, embed):
        return embed(context)

    def cross(self, layer, compute):
        return compute()


def before_cache(model: S2DiT) -> StreamCache:
    args = model.args
    schedule = ChunkSchedule(args.window, args.sink)
    layers = [
        ConcatKVCache(schedule) if attention_kind(k).softmax else attention_kind(k).make_cache(args)
        for k in args.layers
    ]
    cache = StreamCache(layers)
    cache.text = NoTextCache()
    return cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chunks", type=int, default=32)
    parser.add_argument("--frames-per-chunk", type=int, default=1, help="latent frames per chunk")
    parser.add_argument("--window", type=int, default=3)
    parser.add_argument("--sink", type=int, default=1)
    parser.add_argument("--latent", type=int, nargs=2, default=[60, 104], help="latent h w")
    parser.add_argument("--layers", default="lcha,ssa,full,lcha")
    parser.add_argument("--small", action="store_true", help="a small model (a quick check)")
    parser.add_argument(
        "--kernels",
        choices=("on", "off"),
        default="off",
        help="the CPU fast path (s2dit_mlx.kernels) for both sides: off, plain MLX (default), "
        "or on, as `s2dit generate` runs on a CPU",
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "streaming.json"))
    opts = parser.parse_args()

    widths = dict(dim=1536, ffn_dim=8960, num_heads=12, text_dim=4096, text_len=512)
    if opts.small:
        widths = dict(dim=192, ffn_dim=512, num_heads=3, text_dim=64, text_len=32)
    args = ModelArgs(
        **widths,
        layers=opts.layers.split(","),
        frames_per_chunk=opts.frames_per_chunk,
        window=opts.window,
        sink=opts.sink,
    )
    mx.random.seed(0)
    model = S2DiT(args)
    mx.eval(model.parameters())
    if opts.kernels == "on":
        kernels.enable_on_cpu(model)
    context = mx.random.normal((1, args.text_len, args.text_dim))
    sampler = Sampler("few-step", steps=4, shift=5.0)
    frames = opts.frames_per_chunk * opts.chunks

    # stream() creates its caches on its first chunk: each stream keeps the cache it got then.
    iters = {
        name: stream(model, context, frames, tuple(opts.latent), sampler, noise=SeededNoise(0))
        for name in ("before", "now")
    }
    rows = {"now": [], "before": []}
    worst = 0.0
    for i in range(opts.chunks):
        latents = {}
        for name, it in iters.items():
            if name == "before" and i == 0:
                model.make_cache = lambda: before_cache(model)  # an instance attribute ...
            mx.reset_peak_memory()
            chunk = next(it)
            if name == "before" and i == 0:
                del model.make_cache  # ... removed again: "now" gets the class's caches
            rows[name].append(
                {"chunk": i + 1, "seconds": chunk.seconds, "peak_mb": mx.get_peak_memory() / 1e6}
            )
            latents[name] = np.array(chunk.latents)
        worst = max(worst, float(np.abs(latents["now"] - latents["before"]).max()))
        print(
            f"chunk {i + 1:3d}: now {rows['now'][-1]['seconds']:.2f} s "
            f"({rows['now'][-1]['peak_mb']:.0f} MB), before {rows['before'][-1]['seconds']:.2f} s "
            f"({rows['before'][-1]['peak_mb']:.0f} MB)",
            flush=True,
        )
    steady = slice(3, None)  # from chunk 4: the window is full
    summary = {}
    for name, r in rows.items():
        t = [x["seconds"] for x in r[steady]]
        p = [x["peak_mb"] for x in r[steady]]
        summary[name] = {
            "median_seconds": statistics.median(t),
            "median_peak_mb": statistics.median(p),
            "peak_spread_from_chunk4": (max(p) - min(p)) / min(p),
            "time_ratio_last_over_chunk4": r[-1]["seconds"] / r[3]["seconds"],
        }
    result = {
        "benchmark": "streaming",
        "model": args.to_dict(),
        "latent_hw": opts.latent,
        "chunks": opts.chunks,
        "cpu_kernels": opts.kernels,
        "sampler": "few-step, 4 steps + 1 writing pass per chunk",
        "summary": summary,
        "time_now_over_before": summary["now"]["median_seconds"]
        / summary["before"]["median_seconds"],
        "max_abs_difference": worst,
        "machine": {"platform": platform.platform()},
        "mlx": mx.__version__,
        "rows": rows,
    }
    write_result(opts.out, result)
    print(
        f"median seconds per chunk (chunks 4-{opts.chunks}): now {summary['now']['median_seconds']:.2f}, "
        f"before {summary['before']['median_seconds']:.2f} ({result['time_now_over_before']:.2f}x); "
        f"peak MB now {summary['now']['median_peak_mb']:.0f}, before "
        f"{summary['before']['median_peak_mb']:.0f}; max |now - before| {worst:.1e}"
    )


if __name__ == "__main__":
    main()
