"""The evaluator's object track (first-frame position and size for the diversity benchmark)."""

from __future__ import annotations

import numpy as np

from s2dit_mlx.world.evaluate import object_track
from s2dit_mlx.world.shapes import ShapesDataset


def test_object_track_follows_the_rendered_object():
    ds = ShapesDataset(height=64, width=64, frames=17, seed=3)
    for index in range(6):
        video, _, attrs = ds.sample(index)
        track = object_track(video)
        path = attrs["path"]
        assert track["present"].all()
        # Centres in pixels, within 1.5 px of where the object was drawn (path: pixels).
        assert np.abs(track["cx"] - np.asarray(path["cx"])).max() < 1.5, index
        assert np.abs(track["cy"] - np.asarray(path["cy"])).max() < 1.5, index
        assert (track["area"] > 4).all()
    blank = np.full((5, 64, 64, 3), 120, np.uint8)
    assert not object_track(blank)["present"].any()
