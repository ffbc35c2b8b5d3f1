"""The moving-shapes dataset: deterministic, well-formed, captions that parse back."""

import itertools

import numpy as np
import pytest

from s2dit_mlx.errors import S2DiTError
from s2dit_mlx.world.evaluate import coherence
from s2dit_mlx.world.shapes import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLOURS,
    MOTIONS,
    SHAPES,
    ShapesDataset,
    caption,
    parse_prompt,
    random_attributes,
    random_prompt,
)

KEYS = ("shape", "colour", "motion", "background")


def test_vocabulary_sizes():
    assert len(SHAPES) >= 3 and len(COLOURS) >= 6 and len(MOTIONS) >= 6
    assert len(BACKGROUNDS) >= 3
    assert set(ATTRIBUTES) == set(KEYS)


def test_palette_is_well_separated():
    # Generated colours drift; a nearest-palette read needs wide gaps (RGB distance, 0..255).
    obj = np.array(list(COLOURS.values()), float)
    bg = np.array(list(BACKGROUNDS.values()), float)
    d_obj = np.linalg.norm(obj[:, None] - obj[None], axis=-1) + np.eye(len(obj)) * 1e9
    assert d_obj.min() >= 100
    assert np.linalg.norm(obj[:, None] - bg[None], axis=-1).min() >= 100


def test_deterministic_per_seed_and_index():
    a = ShapesDataset(64, 64, 17, seed=3)
    b = ShapesDataset(64, 64, 17, seed=3)
    # Order of access must not matter: each clip is a pure function of (seed, index).
    later = [b.sample(i) for i in (9, 2, 5)]
    for i, (vb, cb, ab) in zip((9, 2, 5), later, strict=True):
        va, ca, aa = a.sample(i)
        np.testing.assert_array_equal(va, vb)
        assert ca == cb and {k: aa[k] for k in KEYS} == {k: ab[k] for k in KEYS}
    other = ShapesDataset(64, 64, 17, seed=4)
    assert any(not np.array_equal(a.sample(i)[0], other.sample(i)[0]) for i in range(3))
    assert not np.array_equal(a.sample(0)[0], a.sample(1)[0])


def test_pinned_clips():
    # Pins the generator: the shipped default model was trained on exactly these clips.
    ds = ShapesDataset(64, 64, 33, seed=0)
    expected = [
        ("a yellow triangle moving down on a black background", 5066866),
        ("a cyan square growing on a gray background", 49734838),
        ("a red triangle moving right on a gray background", 48212333),
    ]
    for i, (text, total) in enumerate(expected):
        video, cap, _ = ds.sample(i)
        assert cap == text
        assert int(video.astype(np.uint64).sum()) == total


@pytest.mark.parametrize(
    "hw,frames", [((64, 64), 33), ((96, 96), 9), ((128, 128), 5), ((64, 96), 17)]
)
def test_object_stays_inside_and_pixels_are_palette(hw, frames):
    h, w = hw
    ds = ShapesDataset(h, w, frames, seed=11)
    for i in range(40):
        video, _, attrs = ds.sample(i)
        assert video.shape == (frames, h, w, 3) and video.dtype == np.uint8
        bg = np.array(BACKGROUNDS[attrs["background"]], np.uint8)
        fg = np.array(COLOURS[attrs["colour"]], np.uint8)
        # Fully visible: the outermost pixel ring of every frame is pure background.
        ring = np.concatenate(
            [video[:, 0], video[:, -1], video[:, :, 0], video[:, :, -1]], axis=1
        ).reshape(-1, 3)
        assert (ring == bg).all(), (hw, i, attrs)
        # Every frame shows the object: a run of pure object-colour pixels, anti-aliased edges.
        is_fg = (video == fg).all(-1).reshape(frames, -1).sum(1)
        assert is_fg.min() >= 9, (hw, i, attrs)
        mixed = ~((video == fg).all(-1) | (video == bg).all(-1))
        assert mixed.any()


def test_motions_follow_their_names():
    ds = ShapesDataset(64, 64, 33, seed=2)
    seen = set()
    for i in range(120):
        a = ds.attributes(i)
        p = a["path"]
        cx, cy, r = p["cx"], p["cy"], p["radius"]
        dx, dy = cx[-1] - cx[0], cy[-1] - cy[0]
        m = a["motion"]
        seen.add(m)
        if m in ("left", "right", "up", "down"):
            along = {"left": -dx, "right": dx, "up": -dy, "down": dy}[m]
            assert along >= 0.29 * 64 and abs(dx * dy) < 1e-6
            assert np.ptp(r) == 0
        elif m == "bouncing":
            # At least one full bounce: the height falls and rises again; x stays put.
            assert np.ptp(cx) == 0 and np.ptp(cy) > 0.2 * 64
            steps = np.sign(np.diff(cy))
            assert (steps[1:] != steps[:-1]).sum() >= 2
        elif m == "growing":
            assert r[-1] >= 2 * r[0] and np.ptp(cx) == 0 and np.ptp(cy) == 0
    assert seen == set(MOTIONS)


def test_long_clips_go_on_past_the_motion():
    """motion_frames=33: the first 33 frames are the 2 s clip; then a moving object stops at the
    edge, a growing one keeps its size, a bouncing one keeps bouncing, and every frame shows
    one coherent object (the 10 s streams of benchmarks/quality.py are read the same way)."""
    short = ShapesDataset(64, 64, 33, seed=6)
    same = ShapesDataset(64, 64, 33, seed=6, motion_frames=33)
    long = ShapesDataset(64, 64, 161, seed=6, motion_frames=33)
    seen = set()
    for i in range(36):
        v_short, cap, a = short.sample(i)
        np.testing.assert_array_equal(same.sample(i)[0], v_short)
        v_long, cap_long, b = long.sample(i)
        assert cap_long == cap
        np.testing.assert_array_equal(v_long[:33], v_short)
        p, m = b["path"], b["motion"]
        seen.add(m)
        cx, cy, r = p["cx"], p["cy"], p["radius"]
        tail = slice(33, None)
        if m == "growing":
            assert (r[tail] == r[32]).all() and r[32] > r[0]
        elif m == "bouncing":
            assert np.ptp(cy[tail]) > 0.2 * 64  # still bouncing after 2 s
        else:
            pos = cx if m in ("left", "right") else cy
            # Stopped at the edge by the end, having moved only towards it after 2 s.
            assert pos[-1] == pos[-2] and pos[-1] in (pos.min(), pos.max())
            step = np.diff(pos[32:])
            towards = -1 if m in ("left", "up") else 1
            assert (step * towards >= 0).all() and abs(pos[-1] - pos[0]) >= abs(pos[32] - pos[0])
        assert coherence(v_long) == 1.0, (i, cap)
    assert seen == set(MOTIONS)
    with pytest.raises(S2DiTError, match="motion_frames"):
        ShapesDataset(64, 64, 33, motion_frames=1)


def test_attributes_cover_every_value():
    ds = ShapesDataset(64, 64, 1, seed=0)
    counts = {k: {v: 0 for v in ATTRIBUTES[k]} for k in KEYS}
    for i in range(600):
        a = ds.attributes(i)
        for k in KEYS:
            counts[k][a[k]] += 1
    for k in KEYS:
        n = len(ATTRIBUTES[k])
        # Uniform: each value within 50% of its expected count.
        assert all(0.5 * 600 / n < c < 1.5 * 600 / n for c in counts[k].values()), counts[k]


def test_every_caption_parses_back():
    for values in itertools.product(*(ATTRIBUTES[k] for k in KEYS)):
        attrs = dict(zip(KEYS, values, strict=True))
        assert parse_prompt(caption(attrs)) == attrs
    assert caption({"shape": "circle", "colour": "red", "motion": "left"}) == (
        "a red circle moving left"
    )


def test_parse_prompt_free_form():
    assert parse_prompt("A Purple ball bouncing on grey") == {
        "shape": "circle", "colour": "purple", "motion": "bouncing", "background": "gray",
    }  # fmt: skip
    assert parse_prompt("blue box moving up and down")["motion"] == "bouncing"
    assert parse_prompt("a red circle moving left") == {
        "shape": "circle", "colour": "red", "motion": "left", "background": None,
    }  # fmt: skip
    # The background's colour word is not the object's.
    p = parse_prompt("on a white background, a cyan triangle grows")
    assert (p["colour"], p["background"], p["motion"]) == ("cyan", "white", "growing")
    assert parse_prompt("a cat")["shape"] is None
    with pytest.raises(S2DiTError, match="names no colour, shape, motion"):
        parse_prompt("a cat", strict=True)


def test_random_prompt():
    a = [random_prompt(np.random.default_rng(5)) for _ in range(2)]
    assert a[0] == a[1]
    rng = np.random.default_rng(0)
    texts = {random_prompt(rng) for _ in range(50)}
    assert len(texts) > 30
    for t in texts:
        assert None not in parse_prompt(t).values()
    assert set(random_attributes(rng)) == set(KEYS)


def test_batches_layout_resume_and_ranks():
    ds = ShapesDataset(32, 32, 5, seed=1)
    it = ds.batches(4)
    first, second = next(it), next(it)
    x, caps = first
    assert x.shape == (4, 5, 32, 32, 3) and x.dtype == np.float32 and len(caps) == 4
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.9
    np.testing.assert_allclose(x[0], ds.sample(0)[0] / 127.5 - 1, atol=1e-6)
    # Resuming at step 1 gives step 1 again.
    resumed = next(ds.batches(4, start=1))
    np.testing.assert_array_equal(resumed[0], second[0])
    assert resumed[1] == second[1]
    # Two ranks with batch 2 split the global batch that one process with batch 4 sees.
    r0, r1 = (
        next(ds.batches(2, start=1, rank=0, world_size=2)),
        next(ds.batches(2, start=1, rank=1, world_size=2)),
    )
    np.testing.assert_array_equal(np.concatenate([r0[0], r1[0]]), second[0])
    assert r0[1] + r1[1] == second[1]


def test_bad_arguments():
    with pytest.raises(S2DiTError):
        ShapesDataset(8, 64, 5)
    with pytest.raises(S2DiTError):
        ShapesDataset(64, 64, 0)
    with pytest.raises(S2DiTError):
        ShapesDataset().sample(-1)
    with pytest.raises(S2DiTError):
        next(ShapesDataset().batches(2, rank=2, world_size=2))


def test_frame_counts():
    for frames in (1, 2, 161):
        video, _, _ = ShapesDataset(64, 64, frames, seed=0).sample(1)
        assert video.shape == (frames, 64, 64, 3)
