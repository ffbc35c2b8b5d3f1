"""Prompt adherence and speed of a moving-shapes model (the built-in teacher by default).

Writes benchmarks/results/quality.json:
- 2-second clips for random prompts and seeds, each read back by s2dit_mlx.world.evaluate:
  colour / shape / motion / all-three accuracy;
- one 10-second streamed clip per prompt in a smaller set: the fraction of frames where the
  object stays one coherent object;
- speed on this machine: seconds per 2-second clip and streaming frames/s.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from s2dit_mlx import setup_blas

setup_blas()  # an entry point: OpenBLAS before mlx.core (s2dit_mlx/_blas.py)

# isort: split
from results_io import write_result

from s2dit_mlx import kernels
from s2dit_mlx.loading import TEACHER_MODEL_DIR
from s2dit_mlx.pipeline import Pipeline
from s2dit_mlx.sampling import SAMPLERS
from s2dit_mlx.world.evaluate import coherence, evaluate, summarise
from s2dit_mlx.world.shapes import random_prompt


def _stat(fn, values: list[float]) -> float | None:
    """fn(values) as a float, or None when there are none (--long-prompts 0)."""
    return float(fn(values)) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(TEACHER_MODEL_DIR))
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--long-prompts", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--long-seconds", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--guidance", type=float, help="override the model's default CFG scale")
    parser.add_argument("--steps", type=int, help="override the model's default denoising steps")
    parser.add_argument("--shift", type=float, help="override the model's default flow shift")
    parser.add_argument("--solver", choices=SAMPLERS, help="override the model's solver")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "quality.json"))
    opts = parser.parse_args()

    pipe = Pipeline.from_pretrained(opts.model)
    kernels.enable_on_cpu(pipe.dit, pipe.vae, pipe.text_encoder)  # as `s2dit generate`
    overrides = {
        k: getattr(opts, k)
        for k in ("guidance", "steps", "shift", "solver")
        if getattr(opts, k) is not None
    }
    fps = pipe.defaults["fps"]
    rng = np.random.default_rng(opts.seed)

    def frames_for(seconds: float) -> int:
        return 1 + 4 * max(1, round(seconds * fps / 4))

    short = frames_for(opts.seconds)
    reports, clip_times = [], []
    for i in range(opts.prompts):
        prompt, seed = random_prompt(rng), int(rng.integers(0, 2**31))
        start = time.perf_counter()
        video = pipe.generate(prompt, frames=short, seed=seed, **overrides)
        clip_times.append(time.perf_counter() - start)
        report = evaluate(video, prompt)
        reports.append(
            {
                "prompt": prompt,
                "seed": seed,
                **{k: report[k] for k in ("colour", "shape", "motion", "background", "all")},
                "predicted": report["predicted"],
            }
        )
        if (i + 1) % 20 == 0:
            acc = summarise(reports)
            print(f"{i + 1} clips: all three {acc['all']:.2f}", flush=True)

    long = frames_for(opts.long_seconds)
    long_runs = []
    for _ in range(opts.long_prompts):
        prompt, seed = random_prompt(rng), int(rng.integers(0, 2**31))
        start = time.perf_counter()
        batches = []
        first = None
        for batch in pipe.stream(prompt, frames=long, seed=seed, **overrides):
            batches.append(batch)
            if first is None:
                first = time.perf_counter() - start
        wall = time.perf_counter() - start
        video = np.concatenate(batches)
        long_runs.append(
            {
                "prompt": prompt,
                "seed": seed,
                "frames": int(video.shape[0]),
                "coherence": coherence(video),
                "frames_per_s": video.shape[0] / wall,
                "first_frames_s": first,
            }
        )

    acc = summarise(reports)
    result = {
        "benchmark": "quality",
        "model": opts.model,
        "size": [pipe.defaults["height"], pipe.defaults["width"]],
        "fps": fps,
        "clip_frames": short,
        "settings": {
            **{k: pipe.defaults[k] for k in ("steps", "guidance", "shift", "mode", "solver")},
            **overrides,
        },
        "accuracy": {k: acc[k] for k in ("colour", "shape", "motion", "all", "background")},
        "seconds_per_clip": float(np.median(clip_times)),
        "long_clip_frames": long,
        "long_coherence_mean": _stat(np.mean, [r["coherence"] for r in long_runs]),
        "long_coherence_min": _stat(np.min, [r["coherence"] for r in long_runs]),
        "streaming_frames_per_s": _stat(np.median, [r["frames_per_s"] for r in long_runs]),
        "machine": {"platform": platform.platform()},
        "clips": reports,
        "long_clips": long_runs,
    }
    write_result(opts.out, result)
    print(
        json.dumps({k: v for k, v in result.items() if k not in ("clips", "long_clips")}, indent=2)
    )


if __name__ == "__main__":
    main()
