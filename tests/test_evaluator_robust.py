"""The evaluator holds up on degraded clips: warp, blur, colour shift and noise."""

import numpy as np

from s2dit_mlx.world.evaluate import degrade, self_check
from s2dit_mlx.world.shapes import ShapesDataset

GOAL = 0.95  # on 500 degraded ground-truth clips, per attribute


def test_degrade_is_a_real_perturbation():
    video, _, _ = ShapesDataset(64, 64, 9, seed=0).sample(0)
    out = degrade(video, np.random.default_rng(0))
    assert out.shape == video.shape and out.dtype == np.uint8
    diff = np.abs(out.astype(int) - video)
    assert diff.mean() > 2 and (diff > 10).mean() > 0.05
    ident = degrade(
        video, np.random.default_rng(0), blur=(0, 0), noise=(0, 0), gain=0, offset=0,
        rotate=0, stretch=0,
    )  # fmt: skip
    np.testing.assert_array_equal(ident, video)


def test_accuracy_on_500_degraded_clips():
    r = self_check(num_clips=500, height=64, width=64, frames=33, seed=0, degraded=True)
    print({k: v for k, v in r.items() if k != "errors"})
    for k in ("colour", "shape", "motion", "background"):
        assert r[k] >= GOAL, (k, r[k], r["errors"][:10])
    assert r["coherence"] >= GOAL
