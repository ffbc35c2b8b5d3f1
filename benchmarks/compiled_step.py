"""Compiling the per-chunk step: streaming seconds per chunk, eager vs `stream(compile=True)`.

Writes benchmarks/results/compiled_step.json. Each chunk's denoising passes run either op by op
(eager, as `s2dit generate` does) or as one compiled MLX graph traced once per chunk with the
caches as its inputs and outputs (`s2dit_mlx.generation.stream(..., compile=True)`). Two models:

- the built-in model (its weights, 4 few-step passes + the writing pass per chunk, 3 latent
  frames of 16x16 per chunk): small enough that per-op dispatch is a large share of a pass;
- a random S2DiT at Wan-1.3B width (dim 1536, ffn 8960), 2 layers (lcha, full), 30x52 latents,
  window 3 with 1 sink: GEMM-bound.

Both sides stream the same prompt and noise, advanced in turns (chunk i eager, chunk i
compiled, ...) so a slow spell of the machine lands on both; the CPU kernels are off on both
(they compute eagerly, so a compiled graph cannot hold them). Latents are checked equal.
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

from s2dit_mlx.generation import Sampler, SeededNoise, stream
from s2dit_mlx.loading import TEACHER_MODEL_DIR, load_dit
from s2dit_mlx.models.s2dit import ModelArgs, S2DiT


def builtin_case():
    """The built-in DiT, a context of its text width, its latent grid."""
    dit = load_dit(TEACHER_MODEL_DIR)
    context = mx.random.normal((1, dit.args.text_len, dit.args.text_dim), key=mx.random.key(1))
    return dit, context, (16, 16)


def wan_width_case():
    """A random 2-layer S2DiT at Wan-1.3B width."""
    args = ModelArgs(
        dim=1536,
        ffn_dim=8960,
        num_heads=12,
        text_dim=4096,
        text_len=512,
        layers=["lcha", "full"],
        frames_per_chunk=1,
        window=3,
        sink=1,
    )
    mx.random.seed(0)
    model = S2DiT(args)
    mx.eval(model.parameters())
    context = mx.random.normal((1, args.text_len, args.text_dim), key=mx.random.key(1))
    return model, context, (30, 52)


def measure(model, context, latent_hw, chunks: int) -> dict:
    """Seconds per chunk of both sides, streamed in turns."""
    sampler = Sampler("few-step", steps=4, shift=5.0)
    frames = model.args.frames_per_chunk * chunks
    iters = {
        name: stream(
            model, context, frames, latent_hw, sampler, noise=SeededNoise(0), compile=compiled
        )
        for name, compiled in (("eager", False), ("compiled", True))
    }
    seconds = {name: [] for name in iters}
    worst = 0.0
    for i in range(chunks):
        latents = {}
        for name, it in iters.items():
            chunk = next(it)
            seconds[name].append(chunk.seconds)
            latents[name] = np.array(chunk.latents)
        worst = max(worst, float(np.abs(latents["eager"] - latents["compiled"]).max()))
        print(
            f"  chunk {i + 1:3d}: eager {seconds['eager'][-1] * 1e3:.1f} ms, "
            f"compiled {seconds['compiled'][-1] * 1e3:.1f} ms",
            flush=True,
        )
    steady = slice(2, None)  # chunk 1 is eager on both sides; from chunk 3 the window is full
    medians = {name: statistics.median(s[steady]) for name, s in seconds.items()}
    return {
        "latent_hw": list(latent_hw),
        "model": model.args.to_dict(),
        "median_seconds": medians,
        "compiled_over_eager": medians["compiled"] / medians["eager"],
        "max_abs_difference": worst,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builtin-chunks", type=int, default=40)
    parser.add_argument("--wan-chunks", type=int, default=8)
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "compiled_step.json")
    )
    opts = parser.parse_args()

    cases = {}
    for name, make, chunks in (
        ("builtin", builtin_case, opts.builtin_chunks),
        ("wan_width_2_layers", wan_width_case, opts.wan_chunks),
    ):
        print(name, flush=True)
        cases[name] = measure(*make(), chunks)
        c = cases[name]
        print(
            f"{name}: eager {c['median_seconds']['eager'] * 1e3:.1f} ms, compiled "
            f"{c['median_seconds']['compiled'] * 1e3:.1f} ms per chunk "
            f"({c['compiled_over_eager']:.2f}x), max |diff| {c['max_abs_difference']:.1e}",
            flush=True,
        )
    result = {
        "benchmark": "compiled_step",
        "sampler": "few-step, 4 steps + 1 writing pass per chunk",
        "cpu_kernels": "off",
        "cases": cases,
        "machine": {"platform": platform.platform()},
        "mlx": mx.__version__,
    }
    write_result(opts.out, result)


if __name__ == "__main__":
    main()
