"""Render a grid GIF of the built-in model's videos, with the prompts, for the README.

python demos/make_samples.py --out demos/samples.gif
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from s2dit_mlx import setup_blas

setup_blas()  # an entry point: OpenBLAS before mlx.core (s2dit_mlx/_blas.py)

# isort: split
from s2dit_mlx import kernels
from s2dit_mlx.loading import DEFAULT_MODEL_DIR
from s2dit_mlx.pipeline import Pipeline
from s2dit_mlx.video_io import write_video

PROMPTS = [
    "a red circle moving left on a black background",
    "a green square moving up on a gray background",
    "a blue triangle moving right on a white background",
    "a yellow circle bouncing on a black background",
    "a purple square growing on a gray background",
    "a cyan triangle moving down on a black background",
    "a yellow square moving left on a white background",
    "a red triangle bouncing on a gray background",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--out", default=str(Path(__file__).parent / "samples.gif"))
    parser.add_argument("--cols", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args()

    pipe = Pipeline.from_pretrained(opts.model)
    kernels.enable_on_cpu(pipe.dit, pipe.vae, pipe.text_encoder)  # as `s2dit generate`
    clips = [pipe.generate(p, seed=opts.seed + i) for i, p in enumerate(PROMPTS)]
    frames, h, w, _ = clips[0].shape
    pad = 2
    rows = -(-len(clips) // opts.cols)
    grid = np.full(
        (frames, rows * (h + pad) + pad, opts.cols * (w + pad) + pad, 3), 40, dtype=np.uint8
    )
    for i, clip in enumerate(clips):
        r, c = divmod(i, opts.cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[:, y : y + h, x : x + w] = clip
    out = Path(opts.out)
    write_video(out, grid, fps=pipe.defaults["fps"])
    prompts = {"prompts": PROMPTS, "seeds": [opts.seed + i for i in range(len(PROMPTS))]}
    out.with_suffix(".json").write_text(json.dumps(prompts, indent=2) + "\n")
    print(f"wrote {out} ({len(clips)} clips, {frames} frames)")


if __name__ == "__main__":
    main()
