"""The prompt-adherence evaluator: proven on ground truth, and it notices wrong videos."""

import numpy as np
import pytest

from s2dit_mlx.errors import S2DiTError
from s2dit_mlx.world.evaluate import (
    analyse,
    coherence,
    evaluate,
    label_components,
    self_check,
    summarise,
)
from s2dit_mlx.world.shapes import BACKGROUNDS, ShapesDataset, render

GOAL = 0.98  # issue 4: >= 98% per attribute on 500 ground-truth clips


def test_accuracy_on_500_ground_truth_clips():
    r = self_check(num_clips=500, height=64, width=64, frames=33, seed=0)
    print({k: v for k, v in r.items() if k != "errors"})
    for k in ("colour", "shape", "motion", "background"):
        assert r[k] >= GOAL, (k, r[k], r["errors"][:10])
    assert r["coherence"] >= GOAL


@pytest.mark.parametrize("hw,frames", [((96, 96), 17), ((128, 128), 9), ((64, 96), 33)])
def test_accuracy_other_sizes(hw, frames):
    r = self_check(num_clips=24, height=hw[0], width=hw[1], frames=frames, seed=1)
    for k in ("colour", "shape", "motion", "background"):
        assert r[k] >= 0.95, (k, r[k], r["errors"][:5])


def _clip(**kw):
    attrs = {"shape": "square", "colour": "red", "motion": "left", "background": "black"}
    attrs.update(kw)
    ds = ShapesDataset(64, 64, 33, seed=0)
    for i in range(2000):  # the first clip with these attributes
        a = ds.attributes(i)
        if all(a[k] == v for k, v in attrs.items()):
            return ds.sample(i)
    raise AssertionError(attrs)


def test_transformed_videos_change_the_reading():
    # Metamorphic checks: the evaluator must follow the pixels, not the prompt.
    video, text, _ = _clip(colour="red", motion="left", shape="square")
    assert evaluate(video, text)["all"]
    assert analyse(video[:, :, ::-1])["motion"] == "right"  # mirrored
    assert analyse(video[::-1])["motion"] == "right"  # played backwards
    assert analyse(video.transpose(0, 2, 1, 3))["motion"] == "up"  # transposed
    assert analyse(video[..., ::-1])["colour"] == "blue"  # red and blue channels swapped
    wrong = evaluate(video, "a green triangle moving down on a white background")
    assert wrong["colour"] is False and wrong["shape"] is False and wrong["motion"] is False
    assert wrong["background"] is False and wrong["all"] is False
    grow, text, _ = _clip(motion="growing")
    assert analyse(grow)["motion"] == "growing" and analyse(grow[::-1])["motion"] != "growing"
    still = np.repeat(video[:1], 33, axis=0)
    assert analyse(still)["motion"] == "static"


def test_evaluate_report_and_summary():
    video, _, _ = _clip(colour="cyan", shape="triangle", motion="bouncing", background="gray")
    r = evaluate(video, "a cyan triangle bouncing")
    assert r["colour"] and r["shape"] and r["motion"] and r["all"]
    assert r["background"] is None  # the prompt does not say
    assert r["predicted"]["background"] == "gray"
    r2 = evaluate(video, {"colour": "red", "shape": "triangle", "motion": "bouncing"})
    assert r2["colour"] is False and not r2["all"]
    s = summarise([r, r2])
    assert s["colour"] == 0.5 and s["shape"] == 1.0 and s["all"] == 0.5
    assert np.isnan(s["background"])


def test_empty_and_bad_videos():
    blank = np.full((9, 32, 32, 3), BACKGROUNDS["gray"], np.uint8)
    p = analyse(blank)
    assert p["colour"] is None and p["shape"] is None and p["motion"] is None
    assert p["background"] == "gray" and p["coherence"] == 0.0
    assert not evaluate(blank, "a red circle moving left")["all"]
    with pytest.raises(S2DiTError, match="frames, height, width, 3"):
        analyse(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(S2DiTError, match="uint8"):
        analyse(np.zeros((3, 32, 32, 3), np.float32))


def test_coherence():
    video, _, attrs = _clip(motion="right", shape="circle")
    assert coherence(video) == 1.0
    # A second object in every frame: no frame has exactly one object.
    p = attrs["path"]
    other = dict(attrs, colour="yellow", shape="square")
    two = render(other, 64 - p["cx"], 64 - p["cy"], p["radius"], 64, 64)
    bg = np.array(BACKGROUNDS[attrs["background"]], np.uint8)
    both = np.where((two != bg).any(-1, keepdims=True), two, video)
    assert coherence(both) == 0.0
    # Object gone in every other frame.
    blink = video.copy()
    blink[1::2] = bg
    assert abs(coherence(blink) - 17 / 33) < 0.01
    # Teleporting across the frame: the frame that jumps does not count.
    x = np.where(np.arange(33) < 10, 12.0, 52.0)
    jump = render(attrs, x, np.full(33, 32.0), np.full(33, 8.0), 64, 64)
    assert coherence(jump) == pytest.approx(32 / 33)


def _flood_fill_labels(mask):
    """Reference labels: plain stack flood fill, label = 1 + largest flat index in component."""
    f, h, w = mask.shape
    lab = np.zeros(mask.shape, np.int64)
    for t in range(f):
        for i in range(h):
            for j in range(w):
                if not mask[t, i, j] or lab[t, i, j]:
                    continue
                stack, comp = [(i, j)], []
                lab[t, i, j] = -1
                while stack:
                    a, b = stack.pop()
                    comp.append((a, b))
                    for c, d in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                        if 0 <= c < h and 0 <= d < w and mask[t, c, d] and not lab[t, c, d]:
                            lab[t, c, d] = -1
                            stack.append((c, d))
                top = max(t * h * w + a * w + b for a, b in comp) + 1
                for a, b in comp:
                    lab[t, a, b] = top
    return lab


@pytest.mark.parametrize("density", [0.3, 0.55, 0.65])
def test_label_components_matches_flood_fill(density):
    # Near the percolation threshold (~0.59) components are long and winding.
    mask = np.random.default_rng(int(density * 100)).random((3, 19, 23)) < density
    np.testing.assert_array_equal(label_components(mask), _flood_fill_labels(mask))
    assert not label_components(np.zeros((2, 4, 4), bool)).any()
