"""Streaming frames/s of the built-in model with the VAE decode of chunk k overlapping the
denoising of chunk k + 1 (its own MLX stream), against decoding in line.

Writes benchmarks/results/decode_overlap.json: 10-second streams, the two settings in turns
(stream i with overlap, stream i without, ...), the same prompts and seeds; the frames must be
identical (checked).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from s2dit_mlx import setup_blas

setup_blas()  # an entry point: OpenBLAS before mlx.core (s2dit_mlx/_blas.py)

# isort: split
from s2dit_mlx import kernels
from s2dit_mlx.loading import TEACHER_MODEL_DIR
from s2dit_mlx.pipeline import Pipeline
from s2dit_mlx.world.shapes import random_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(TEACHER_MODEL_DIR))
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--frames", type=int, default=161, help="pixel frames (161: 10 s)")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "decode_overlap.json")
    )
    opts = parser.parse_args()

    pipe = Pipeline.from_pretrained(opts.model)
    kernels.enable_on_cpu(pipe.dit, pipe.vae, pipe.text_encoder)  # as `s2dit generate`
    rng = np.random.default_rng(opts.seed)
    pipe.generate(random_prompt(rng), frames=17, seed=0)  # warm-up: compile, caches
    rates = {"overlap": [], "in_line": []}
    for i in range(opts.streams):
        prompt, seed = random_prompt(rng), int(rng.integers(0, 2**31))
        videos = {}
        for name in ("overlap", "in_line") if i % 2 == 0 else ("in_line", "overlap"):
            pipe.overlap_decode = name == "overlap"
            start = time.perf_counter()
            videos[name] = pipe.generate(prompt, frames=opts.frames, seed=seed)
            rates[name].append(opts.frames / (time.perf_counter() - start))
        assert np.array_equal(videos["overlap"], videos["in_line"]), "overlap changed the frames"
        print(
            f"stream {i + 1}: overlap {rates['overlap'][-1]:.1f}, in line "
            f"{rates['in_line'][-1]:.1f} frames/s",
            flush=True,
        )
    result = {
        "benchmark": "decode_overlap",
        "model": opts.model,
        "frames": opts.frames,
        "frames_per_s": {k: statistics.median(v) for k, v in rates.items()},
        "ratio": statistics.median(rates["overlap"]) / statistics.median(rates["in_line"]),
        "runs": rates,
        "machine": {"platform": platform.platform()},
    }
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("frames_per_s", "ratio")}, indent=2))


if __name__ == "__main__":
    main()
