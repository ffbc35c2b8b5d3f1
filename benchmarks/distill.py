"""The distilled students against their teacher, in one run (the built-in model's 2-in-1 chain).

Writes benchmarks/results/distill.json. For each model (a folder, with sampler overrides):
- prompt adherence: colour / shape / motion / all three over `--prompts` random prompts and
  seeds (2-second clips read back by the world's evaluator);
- 10-second streamed coherence over `--streams` streams: the fraction of frames holding one
  coherent object (mean and minimum);
- cost: DiT passes per chunk (denoising passes, doubled by guidance, plus the writing pass),
  seconds per 2-second clip and streaming frames/s, every model timed in turns prompt by prompt
  so a slow spell of the machine lands on all of them;
- diversity: for `--diversity-prompts` prompts x `--diversity-seeds` seeds, the spread (standard
  deviation over the seeds, averaged over the prompts) of the object's first-frame centre and
  size, in units of the frame; a distilled student that collapses to one answer per prompt has
  a small spread.

    python benchmarks/distill.py --model teacher=s2dit_mlx/assets/teacher \\
        --model teacher-4-euler=s2dit_mlx/assets/teacher:steps=4,guidance=1 \\
        --model kd=runs/kd/model --model ar-4=runs/dmd4/model --model ar-2=runs/dmd2/model
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
from s2dit_mlx.pipeline import Pipeline
from s2dit_mlx.world.evaluate import coherence, evaluate, object_track, summarise
from s2dit_mlx.world.shapes import random_prompt

SETTING_TYPES = {"steps": int, "guidance": float, "shift": float, "solver": str}


def parse_model(text: str) -> tuple[str, str, dict]:
    """'name=folder[:key=value,...]' -> (name, folder, sampler overrides)."""
    name, _, rest = text.partition("=")
    folder, _, settings = rest.partition(":")
    overrides = {}
    for item in filter(None, settings.split(",")):
        key, _, value = item.partition("=")
        overrides[key] = SETTING_TYPES[key](value)
    return name, folder, overrides


def first_frame_object(video: np.ndarray) -> tuple[float, float, float] | None:
    """(centre x, centre y, sqrt of area) of the object in the first frame with one, in frames."""
    track = object_track(video)
    h, w = video.shape[1:3]
    present = np.flatnonzero(track["present"])
    if present.size == 0:
        return None
    i = present[0]
    return track["cx"][i] / w, track["cy"][i] / h, np.sqrt(track["area"][i] / (h * w))


def passes_per_chunk(settings: dict) -> int:
    steps, guided = settings["steps"], settings["guidance"] != 1.0
    return steps * (2 if guided else 1) + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="name=folder[:k=v,...]")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--diversity-prompts", type=int, default=25)
    parser.add_argument("--diversity-seeds", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--long-seconds", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "distill.json"))
    opts = parser.parse_args()

    models = {}
    for text in opts.model:
        name, folder, overrides = parse_model(text)
        pipe = Pipeline.from_pretrained(folder)
        kernels.enable_on_cpu(pipe.dit, pipe.vae, pipe.text_encoder)  # as `s2dit generate`
        settings = {**{k: pipe.defaults[k] for k in SETTING_TYPES}, **overrides}
        models[name] = {
            "pipe": pipe,
            "folder": folder,
            "overrides": overrides,
            "settings": settings,
        }
    first = next(iter(models.values()))["pipe"]
    fps = first.defaults["fps"]

    def frames_for(seconds: float) -> int:
        return 1 + 4 * max(1, round(seconds * fps / 4))

    rng = np.random.default_rng(opts.seed)
    clips = [(random_prompt(rng), int(rng.integers(0, 2**31))) for _ in range(opts.prompts)]
    streams = [(random_prompt(rng), int(rng.integers(0, 2**31))) for _ in range(opts.streams)]
    diversity = [random_prompt(rng) for _ in range(opts.diversity_prompts)]
    results = {name: {"reports": [], "clip_s": [], "long": [], "spread": []} for name in models}

    short, long = frames_for(opts.seconds), frames_for(opts.long_seconds)
    for i, (prompt, seed) in enumerate(clips):  # models in turns, prompt by prompt
        for name, m in models.items():
            start = time.perf_counter()
            video = m["pipe"].generate(prompt, frames=short, seed=seed, **m["overrides"])
            results[name]["clip_s"].append(time.perf_counter() - start)
            report = evaluate(video, prompt)
            results[name]["reports"].append(report)
        if (i + 1) % 20 == 0:
            line = ", ".join(
                f"{n} {summarise(r['reports'])['all']:.2f}" for n, r in results.items()
            )
            print(f"{i + 1} clips, all three: {line}", flush=True)
    for prompt, seed in streams:
        for name, m in models.items():
            start = time.perf_counter()
            video = np.concatenate(
                list(m["pipe"].stream(prompt, frames=long, seed=seed, **m["overrides"]))
            )
            wall = time.perf_counter() - start
            results[name]["long"].append(
                {
                    "coherence": coherence(video),
                    "frames_per_s": video.shape[0] / wall,
                }
            )
    for prompt in diversity:
        for name, m in models.items():
            found = []
            for s in range(opts.diversity_seeds):
                video = m["pipe"].generate(prompt, frames=short, seed=10_000 + s, **m["overrides"])
                obj = first_frame_object(video)
                if obj is not None:
                    found.append(obj)
            if len(found) >= 2:
                results[name]["spread"].append(np.std(np.array(found), axis=0).tolist())

    table = {}
    for name, r in results.items():
        acc = summarise(r["reports"])
        spread = np.mean(np.array(r["spread"]), axis=0) if r["spread"] else np.zeros(3)
        coh = [x["coherence"] for x in r["long"]]
        table[name] = {
            "folder": models[name]["folder"],
            "settings": models[name]["settings"],
            "passes_per_chunk": passes_per_chunk(models[name]["settings"]),
            "accuracy": {k: acc[k] for k in ("colour", "shape", "motion", "all")},
            "coherence_mean": float(np.mean(coh)) if coh else None,
            "coherence_min": float(np.min(coh)) if coh else None,
            "seconds_per_clip": float(np.median(r["clip_s"])),
            "streaming_frames_per_s": float(np.median([x["frames_per_s"] for x in r["long"]]))
            if r["long"]
            else None,
            "diversity": {
                "centre_x": float(spread[0]),
                "centre_y": float(spread[1]),
                "size": float(spread[2]),
                "total": float(spread.sum()),
            },
        }
    result = {
        "benchmark": "distill",
        "prompts": opts.prompts,
        "streams": opts.streams,
        "diversity_prompts": opts.diversity_prompts,
        "diversity_seeds": opts.diversity_seeds,
        "clip_frames": short,
        "long_clip_frames": long,
        "models": table,
        "machine": {"platform": platform.platform()},
    }
    write_result(opts.out, result)
    print(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
