"""Moving shapes: a procedural text-to-video world, deterministic by seed, no downloads.

Each clip shows one shape of one colour doing one motion on a plain background, with a caption
such as "a red circle moving left on a black background". Sizes, speeds and start positions are
random; the object stays fully inside the frame for the whole clip. Motions are defined over
the clip's normalised time (0 at the first frame, 1 at the last), so any frame count works;
with `motion_frames` a motion spans that many frames and a longer clip goes on like a long
stream (a moving object stops at the frame edge, a growing one keeps its final size).

    ds = ShapesDataset(height=64, width=64, frames=33, seed=0)
    video, caption, attrs = ds.sample(7)            # uint8 [F, H, W, 3]
    for videos, captions in ds.batches(8):           # float32 [B, F, H, W, 3] in [-1, 1]
        ...
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..errors import S2DiTError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Saturated hues, far apart in RGB (closest pair: blue/purple, ~115) and far from every
# background (>= 115), so a blurred, noisy or colour-shifted render is still unambiguous.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 70),
    "blue": (50, 90, 240),
    "yellow": (240, 210, 40),
    "purple": (160, 70, 220),
    "cyan": (40, 210, 220),
}
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "bouncing", "growing")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (8, 8, 8),
    "gray": (120, 120, 120),
    "white": (240, 240, 240),
}
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "motion": MOTIONS,
    "background": tuple(BACKGROUNDS),
}

_MOTION_PHRASE = {
    "left": "moving left",
    "right": "moving right",
    "up": "moving up",
    "down": "moving down",
    "bouncing": "bouncing",
    "growing": "growing",
}

# Words a user may type for each value (the canonical name first).
_SYNONYMS: dict[str, dict[str, tuple[str, ...]]] = {
    "shape": {
        "circle": ("circle", "circles", "ball", "disc", "disk", "dot", "round"),
        "square": ("square", "squares", "box", "block", "cube"),
        "triangle": ("triangle", "triangles", "triangular"),
    },
    "colour": {
        "red": ("red",),
        "green": ("green",),
        "blue": ("blue",),
        "yellow": ("yellow",),
        "purple": ("purple", "violet"),
        "cyan": ("cyan", "turquoise", "aqua"),
    },
    "motion": {
        "left": ("left", "leftward", "leftwards", "westward"),
        "right": ("right", "rightward", "rightwards", "eastward"),
        "up": ("up", "upward", "upwards", "rising", "rises", "ascending"),
        "down": ("down", "downward", "downwards", "falling", "falls", "descending", "sinking"),
        "bouncing": ("bouncing", "bounces", "bounce", "bouncy", "hopping", "jumping"),
        "growing": ("growing", "grows", "grow", "expanding", "expands", "enlarging", "bigger"),
    },
    "background": {
        "black": ("black", "dark"),
        "gray": ("gray", "grey"),
        "white": ("white",),
    },
}


def _lookup(kind: str) -> dict[str, str]:
    return {w: v for v, words in _SYNONYMS[kind].items() for w in words}


# Sizes are fractions of min(height, width); travel is a fraction of the frame along the motion.
_SIZE = (0.10, 0.17)  # "radius" of a constant-size object
_GROW_END = (0.16, 0.22)  # final radius of a growing object
_GROW_FACTOR = (2.0, 2.6)  # final / initial radius
_TRAVEL = (0.30, 0.60)  # distance covered by a left/right/up/down motion over the clip
_BOUNCE_HEIGHT = (0.55, 1.0)  # fraction of the free vertical room used by a bounce
_BOUNCES = (1.5, 2.5)  # bounces per clip
_MARGIN = 1.0  # pixels kept free at the frame edge


def caption(attrs: dict[str, Any]) -> str:
    """The canonical caption, e.g. "a red circle moving left on a black background"."""
    text = f"a {attrs['colour']} {attrs['shape']} {_MOTION_PHRASE[attrs['motion']]}"
    if attrs.get("background") is not None:
        text += f" on a {attrs['background']} background"
    return text


def parse_prompt(text: str, strict: bool = False) -> dict[str, str | None]:
    """Read shape, colour, motion and background from a free-form prompt (None when absent).

    The background is the colour word right before "background" (or after "on a"); the
    object's colour is the first colour word elsewhere. With strict=True a prompt missing the
    shape, colour or motion raises S2DiTError.
    """
    words = re.findall(r"[a-z]+", text.lower())
    bg_words, colour_words = _lookup("background"), _lookup("colour")
    attrs: dict[str, str | None] = dict.fromkeys(ATTRIBUTES)
    used: set[int] = set()
    for i, w in enumerate(words):
        if w in ("background", "backdrop", "bg") and i > 0 and words[i - 1] in bg_words:
            attrs["background"], used = bg_words[words[i - 1]], used | {i - 1}
            break
        # "... on black", "... on a white" (no "background" word)
        if w in bg_words and i > 0 and words[i - 1] in ("on", "a", "an"):
            if words[i - 1] == "on" or (i > 1 and words[i - 2] == "on"):
                attrs["background"], used = bg_words[w], used | {i}
    for kind in ("shape", "motion", "colour"):
        table = _lookup(kind)
        for i, w in enumerate(words):
            if i in used or w not in table:
                continue
            # "dark" alone is not a colour; it only names a background.
            if kind == "colour" and w not in colour_words:
                continue
            attrs[kind] = table[w]
            break
    if {"up", "down"} <= set(words):  # "moving up and down"
        attrs["motion"] = "bouncing"
    if strict:
        missing = [k for k in ("colour", "shape", "motion") if attrs[k] is None]
        if missing:
            raise S2DiTError(
                f"prompt {text!r} names no {', '.join(missing)} (expected e.g. "
                f"'a red circle moving left on a black background')"
            )
    return attrs


def random_attributes(rng: np.random.Generator) -> dict[str, str]:
    """Shape, colour, motion and background drawn uniformly."""
    return {k: str(rng.choice(v)) for k, v in ATTRIBUTES.items()}


def random_prompt(rng: np.random.Generator) -> str:
    """A caption for uniformly drawn attributes."""
    return caption(random_attributes(rng))


def _half_extents(shape: str, r: float) -> tuple[float, float, float, float]:
    """Distances from the shape's centre to its (left, right, top, bottom) edges, in pixels."""
    if shape == "circle":
        return r, r, r, r
    if shape == "square":
        a = _SQUARE * r
        return a, a, a, a
    if shape == "triangle":
        big = _TRIANGLE * r  # circumradius; the centre is the centroid
        half_w = big * math.sqrt(3) / 2
        return half_w, half_w, big, big / 2
    raise S2DiTError(f"unknown shape {shape!r} (expected one of {', '.join(SHAPES)})")


# Square half-side and triangle circumradius per unit "radius": close to a circle's area.
_SQUARE = 0.9
_TRIANGLE = 1.45


def shape_sdf(shape: str, x: np.ndarray, y: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Signed distance (pixels, negative inside) from points (x, y) relative to the centre."""
    if shape == "circle":
        return np.sqrt(x * x + y * y) - r
    if shape == "square":
        return np.maximum(np.abs(x), np.abs(y)) - _SQUARE * r
    if shape == "triangle":
        # Upright equilateral triangle as three half-planes; the inradius is half the circumradius.
        inr = _TRIANGLE * r / 2
        s, c = math.sqrt(3) / 2, 0.5
        return np.maximum(np.maximum(y - inr, s * x - c * y - inr), -s * x - c * y - inr)
    raise S2DiTError(f"unknown shape {shape!r} (expected one of {', '.join(SHAPES)})")


def render(
    attrs: dict[str, Any],
    cx: np.ndarray,
    cy: np.ndarray,
    radius: np.ndarray,
    height: int,
    width: int,
    supersample: int = 2,
) -> np.ndarray:
    """Draw a clip from per-frame centres and radii (pixels) as uint8 [F, H, W, 3]."""
    cx, cy, radius = (np.asarray(a, np.float32) for a in (cx, cy, radius))
    ss = max(int(supersample), 1)
    # Only the box the object ever touches is drawn; the rest of every frame is background.
    left, right, top, bottom = _half_extents(attrs["shape"], float(radius.max()))
    x0 = max(int(np.floor(cx.min() - left)) - 1, 0)
    x1 = min(int(np.ceil(cx.max() + right)) + 2, width)
    y0 = max(int(np.floor(cy.min() - top)) - 1, 0)
    y1 = min(int(np.ceil(cy.max() + bottom)) + 2, height)
    cover = np.zeros((cx.shape[0], y1 - y0, x1 - x0), np.float32)
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    cx, cy, radius = cx[:, None, None], cy[:, None, None], radius[:, None, None]
    # ss x ss sub-pixel samples, each with a linear ramp one sample wide: a smooth box filter.
    for oy in range(ss):
        for ox in range(ss):
            px = xs + (ox + 0.5) / ss - cx
            py = ys + (oy + 0.5) / ss - cy
            d = shape_sdf(attrs["shape"], px, py, radius)
            cover += np.clip(0.5 - d * ss, 0.0, 1.0)
    cover = (cover / (ss * ss))[..., None]
    fg = np.asarray(COLOURS[attrs["colour"]], np.float32)
    bg = np.asarray(BACKGROUNDS[attrs["background"]], np.uint8)
    video = np.empty((cx.shape[0], height, width, 3), np.uint8)
    video[:] = bg
    crop = bg.astype(np.float32) + (fg - bg) * cover
    video[:, y0:y1, x0:x1] = np.clip(np.rint(crop), 0, 255).astype(np.uint8)
    return video


def trajectory(
    attrs: dict[str, str],
    rng: np.random.Generator,
    height: int,
    width: int,
    frames: int,
    motion_frames: int | None = None,
) -> dict[str, Any]:
    """Draw a random size, start and speed for attrs; return per-frame centre and radius.

    One motion (its travel, growth or bounces) spans `motion_frames` frames (default: the
    clip). Past that, as in a long stream, it goes on at the same pace: a moving object stops
    at the frame edge, a growing one keeps its final size, a bouncing one keeps bouncing.
    """
    size = min(height, width)
    period = motion_frames or frames
    # Progress through the motion per frame: 0 .. 1 over `period` frames, beyond 1 after it.
    if period > 1:
        u = np.linspace(0.0, (frames - 1) / (period - 1), frames)
    else:
        u = np.zeros(frames)
    shape, motion = attrs["shape"], attrs["motion"]
    if motion == "growing":
        r1 = rng.uniform(*_GROW_END) * size
        r0 = r1 / rng.uniform(*_GROW_FACTOR)
        radius = r0 + (r1 - r0) * np.minimum(u, 1.0)
    else:
        r1 = rng.uniform(*_SIZE) * size
        radius = np.full_like(u, r1)
    left, right, top, bottom = _half_extents(shape, r1)
    # Range of centre positions keeping the largest extent of the object inside the frame.
    x_lo, x_hi = left + _MARGIN, width - right - _MARGIN
    y_lo, y_hi = top + _MARGIN, height - bottom - _MARGIN
    params: dict[str, float] = {"radius": float(r1)}
    if motion in ("left", "right", "up", "down"):
        horizontal = motion in ("left", "right")
        lo, hi = (x_lo, x_hi) if horizontal else (y_lo, y_hi)
        extent = width if horizontal else height
        travel = min(rng.uniform(*_TRAVEL) * extent, hi - lo)
        start = rng.uniform(lo, max(hi - travel, lo))
        path = start + travel * u
        if motion in ("left", "up"):
            path = (2 * start + travel) - path  # same segment, walked the other way
        if u[-1] > 1.0:
            path = np.clip(path, lo, hi)  # past the motion's span: stopped at the edge
        other = rng.uniform(*((y_lo, y_hi) if horizontal else (x_lo, x_hi)))
        cx, cy = (path, np.full_like(u, other)) if horizontal else (np.full_like(u, other), path)
        params["travel"] = float(travel)
    elif motion == "bouncing":
        room = y_hi - y_lo
        bounce = rng.uniform(*_BOUNCE_HEIGHT) * room
        floor = rng.uniform(y_lo + bounce, y_hi)
        count = rng.uniform(*_BOUNCES)
        phase = rng.uniform(0.0, 1.0)
        cy = floor - bounce * np.abs(np.sin(np.pi * (count * u + phase)))
        cx = np.full_like(u, rng.uniform(x_lo, x_hi))
        params.update(bounce=float(bounce), bounces=float(count))
    elif motion == "growing":
        cx = np.full_like(u, rng.uniform(x_lo, x_hi))
        cy = np.full_like(u, rng.uniform(y_lo, y_hi))
        params["start_radius"] = float(r0)
    else:
        raise S2DiTError(f"unknown motion {motion!r} (expected one of {', '.join(MOTIONS)})")
    return {"cx": cx, "cy": cy, "radius": radius, "params": params}


class ShapesDataset:
    """Clips of one moving shape with captions; sample(index) is a pure function of (seed, index)."""

    def __init__(
        self,
        height: int = 64,
        width: int = 64,
        frames: int = 33,
        seed: int = 0,
        supersample: int = 2,
        motion_frames: int | None = None,
    ):
        if height < 16 or width < 16 or frames < 1:
            raise S2DiTError(
                f"shapes clips need height, width >= 16 and frames >= 1 "
                f"(got {height}x{width}, {frames} frames)"
            )
        if motion_frames is not None and motion_frames < 2:
            raise S2DiTError(f"motion_frames must be at least 2 (got {motion_frames})")
        self.height, self.width, self.frames = int(height), int(width), int(frames)
        self.seed, self.supersample = int(seed), int(supersample)
        # None: one motion spans the clip; N: it spans N frames and goes on past them.
        self.motion_frames = motion_frames

    def attributes(self, index: int) -> dict[str, Any]:
        """The attributes and motion path of clip `index` (without drawing it)."""
        if index < 0:
            raise S2DiTError(f"clip index must be >= 0 (got {index})")
        # Seeding with (seed, index) makes each clip independent of how many came before.
        rng = np.random.default_rng([self.seed, int(index)])
        attrs: dict[str, Any] = random_attributes(rng)
        path = trajectory(attrs, rng, self.height, self.width, self.frames, self.motion_frames)
        attrs.update(path["params"])
        attrs["path"] = {k: path[k] for k in ("cx", "cy", "radius")}
        return attrs

    def sample(self, index: int) -> tuple[np.ndarray, str, dict[str, Any]]:
        """Clip `index`: (uint8 video [F, H, W, 3], caption, attributes)."""
        attrs = self.attributes(index)
        p = attrs["path"]
        video = render(
            attrs, p["cx"], p["cy"], p["radius"], self.height, self.width, self.supersample
        )
        return video, caption(attrs), attrs

    __getitem__ = sample

    def batch(self, indices: list[int] | np.ndarray) -> tuple[np.ndarray, list[str]]:
        """Clips `indices` as float32 [B, F, H, W, 3] in [-1, 1] and their captions."""
        videos, captions = [], []
        for i in indices:
            v, c, _ = self.sample(int(i))
            videos.append(v)
            captions.append(c)
        x = np.stack(videos).astype(np.float32) * (2.0 / 255.0) - 1.0
        return x, captions

    def batches(
        self, batch_size: int, start: int = 0, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[np.ndarray, list[str]]]:
        """Endless batches for training; step s holds clips [s*G + rank*B, +B), G = B*world_size.

        `start` is the first step (resume continues exactly); with several processes each rank
        gets its own slice of the same global batch that one process with G would see.
        """
        if batch_size < 1 or not 0 <= rank < world_size:
            raise S2DiTError(
                f"bad batch layout: batch_size={batch_size}, rank={rank}, world_size={world_size}"
            )
        step = int(start)
        while True:
            first = step * batch_size * world_size + rank * batch_size
            yield self.batch(range(first, first + batch_size))
            step += 1
