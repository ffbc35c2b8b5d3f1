"""Prompt adherence for the moving-shapes world: read a video's pixels, name what it shows.

A deterministic analyser (numpy only) that reports the object's colour, shape and motion and
the background of a uint8 [F, H, W, 3] clip, built to survive generated-video artefacts (blur,
noise, colour shifts, slightly wrong shapes):

- background: per-frame median of the border pixels, nearest background palette colour;
- object: pixels whose (3x3-smoothed) colour distance to the background exceeds half the
  object's contrast, largest 4-connected component per frame;
- colour: median of the object's inner pixels, nearest object palette colour;
- shape: best soft IoU against a circle / square / triangle template of the same area and
  centroid, with the edge softness (blur) and a slight tilt fitted, averaged over frames
  where the object is at least half its largest size;
- motion: linear fits over normalised time of the centroid and of log(area): the area ratio
  says "growing", the vertical wobble around the fit says "bouncing", else the larger
  displacement names left / right / up / down ("static" when it barely moves; None with
  fewer than 3 frames showing the object);
- coherence: the fraction of frames with exactly one sizeable object whose size and place
  follow on from the previous one (for long streamed clips; very short clips of fast
  motions can read below 1).

    report = evaluate(video, "a red circle moving left on a black background")
    report["colour"], report["shape"], report["motion"], report["all"]   # booleans
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import S2DiTError
from .shapes import BACKGROUNDS, COLOURS, SHAPES, parse_prompt, shape_sdf

_OBJ_NAMES = tuple(COLOURS)
_OBJ_RGB = np.array([COLOURS[k] for k in _OBJ_NAMES], np.float32)
_BG_NAMES = tuple(BACKGROUNDS)
_BG_RGB = np.array([BACKGROUNDS[k] for k in _BG_NAMES], np.float32)
# Area of each template shape per unit "radius" squared (see shapes.shape_sdf).
_UNIT_AREA = {"circle": np.pi, "square": 4 * 0.9**2, "triangle": 3 * np.sqrt(3) / 4 * 1.45**2}

MIN_CONTRAST = 30.0  # colour distance below which nothing counts as an object
GROW_RATIO = 1.8  # end/start area ratio above which the object is "growing" (data: >= 4)
BOUNCE_WOBBLE = 0.03  # std of height around a straight path, in frame heights (data: >= 0.06)
STATIC_TRAVEL = 0.08  # displacement, in frame sizes, below which the object is "static"
SHAPE_FRAMES = 6  # frames sampled for the shape fit
_RAMPS = (1.0, 1.75, 2.5, 3.5, 4.5)  # template edge widths tried, pixels
_ANGLES = (-14.0, -7.0, 0.0, 7.0, 14.0)  # template tilts tried, degrees (generated shapes lean)


def _box3(x: np.ndarray) -> np.ndarray:
    """3x3 mean over the last two axes (zero outside)."""
    rows = x.copy()
    rows[..., 1:, :] += x[..., :-1, :]
    rows[..., :-1, :] += x[..., 1:, :]
    out = rows.copy()
    out[..., 1:] += rows[..., :-1]
    out[..., :-1] += rows[..., 1:]
    out *= 1.0 / 9.0
    return out


def label_components(mask: np.ndarray) -> np.ndarray:
    """4-connected components of each frame of a bool [F, H, W] mask (0 = background).

    Vectorised label propagation over the foreground pixels only: each takes the largest label
    among itself and its neighbours, then jumps to its label's own label (pointer jumping),
    until nothing changes. A component's label is 1 + the flat index of its last pixel, so
    labels never collide across frames.
    """
    f, h, w = mask.shape
    fg = np.flatnonzero(mask)
    out = np.zeros(mask.size, np.int32)
    if fg.size == 0:
        return out.reshape(mask.shape)
    # Local index of every foreground pixel; neighbours off the mask or frame point to self.
    local = np.full(mask.size, -1, np.int32)
    own = np.arange(fg.size, dtype=np.int32)
    local[fg] = own
    x, y = fg % w, (fg // w) % h
    nbrs = []
    for step, ok in ((-1, x > 0), (1, x < w - 1), (-w, y > 0), (w, y < h - 1)):
        j = np.where(ok, local[np.where(ok, fg + step, fg)], -1)
        nbrs.append(np.where(j >= 0, j, own))
    lab = own.copy()  # labels as local indices; maximum = last pixel of the component
    while True:
        new = np.maximum.reduce([lab] + [lab[n] for n in nbrs])
        new = new[new]
        new = new[new]
        if np.array_equal(new, lab):
            break
        lab = new
    out[fg] = fg[lab] + 1
    return out.reshape(mask.shape)


def _check_video(video: np.ndarray) -> np.ndarray:
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or min(video.shape[1:3]) < 8:
        raise S2DiTError(f"expected a video of shape [frames, height, width, 3], got {video.shape}")
    if video.dtype != np.uint8:
        raise S2DiTError(f"expected a uint8 video, got {video.dtype}")
    return video


def _segment(video: np.ndarray) -> dict[str, Any]:
    """Background, colour distance, object mask and per-frame component statistics."""
    v = video.astype(np.float32)
    f, h, w, _ = v.shape
    b = max(1, min(h, w) // 32)  # border strip width
    border = np.concatenate(
        [v[:, :b].reshape(f, -1, 3), v[:, -b:].reshape(f, -1, 3)]
        + [v[:, b:-b, :b].reshape(f, -1, 3), v[:, b:-b, -b:].reshape(f, -1, 3)],
        axis=1,
    )
    bg = np.median(border, axis=1)  # [F, 3]
    diff = v - bg[:, None, None]
    dist = np.sqrt(np.einsum("fhwc,fhwc->fhw", diff, diff))  # [F, H, W]
    noise = float(np.median(np.sqrt(((border - bg[:, None]) ** 2).sum(-1))))
    smooth = _box3(dist)
    contrast = float(np.median(smooth.reshape(f, -1).max(1)))
    thresh = max(noise + 0.5 * (contrast - noise), MIN_CONTRAST, 3.0 * noise)
    mask = smooth > thresh
    lab = label_components(mask)
    counts = np.bincount(lab.reshape(-1), minlength=lab.size + 1)[1:].reshape(f, h * w)
    best = counts.argmax(1)  # flat in-frame index of each frame's largest component's label
    area = counts[np.arange(f), best].astype(np.float64)
    counts[np.arange(f), best] = 0
    second = counts.max(1).astype(np.float64)
    label = best + 1 + np.arange(f) * h * w
    # The object's pixels, from the foreground list (cheaper than scanning whole frames).
    flat = lab.reshape(-1)
    pix = np.flatnonzero(flat)
    pix = pix[flat[pix] == label[pix // (h * w)]]
    obj = np.zeros(f * h * w, bool)
    obj[pix] = True
    pf, py, px = pix // (h * w), (pix // w) % h, pix % w
    a = np.maximum(area, 1.0)
    cx = np.bincount(pf, weights=px + 0.5, minlength=f) / a
    cy = np.bincount(pf, weights=py + 0.5, minlength=f) / a
    return dict(
        v=v, bg=bg, dist=dist, noise=noise, contrast=contrast, thresh=thresh,
        obj=obj.reshape(f, h, w), pix=pix, area=area, second=second, cx=cx, cy=cy,
        min_area=max(6.0, 2e-3 * h * w),
    )  # fmt: skip


def _nearest(rgb: np.ndarray, palette: np.ndarray, names: tuple[str, ...]) -> str:
    return names[int(np.argmin(((palette - rgb) ** 2).sum(-1)))]


def _shape_scores(seg: dict[str, Any], frames: np.ndarray) -> dict[str, float]:
    """Mean soft IoU of the object with each template shape over `frames`.

    Each template has the object's soft area and centroid; its edge ramp is swept over a few
    widths and the best kept, so a blurred object is compared with equally soft templates
    rather than punished for its blur the same way by all of them.
    """
    obj, dist = seg["obj"][frames], seg["dist"][frames]
    # Soft coverage: 0 at the noise floor, 1 at the object's contrast; only near the object.
    alpha = np.clip((dist - seg["noise"]) / max(seg["contrast"] - seg["noise"], 1e-3), 0, 1)
    near = obj.astype(np.float32)
    for _ in range(3):
        near = (_box3(near) > 0).astype(np.float32)
    alpha = alpha * near
    area = alpha.sum((1, 2))
    h, w = obj.shape[1:]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    wx = (alpha * xs).sum((1, 2)) / np.maximum(area, 1e-6)
    wy = (alpha * ys).sum((1, 2)) / np.maximum(area, 1e-6)
    # Work on a window around each centroid: every template fits in it, even at the widest ramp.
    half = int(np.ceil(0.9 * np.sqrt(area.max()) + _RAMPS[-1] + 2))
    pad = np.pad(alpha, ((0, 0), (half, half), (half, half)))
    ix, iy = np.floor(wx).astype(int), np.floor(wy).astype(int)
    size = 2 * half + 1
    win = np.stack(
        [pad[i, y : y + size, x : x + size] for i, (x, y) in enumerate(zip(ix, iy, strict=True))]
    )
    off = np.arange(-half, half + 1, dtype=np.float32)
    px = off[None, None, :] + (ix + 0.5 - wx)[:, None, None]
    py = off[None, :, None] + (iy + 0.5 - wy)[:, None, None]

    def iou(shape: str, r: np.ndarray, angle: float, ramp: float) -> float:
        c, s = np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))
        tmpl = np.clip(0.5 - shape_sdf(shape, c * px + s * py, c * py - s * px, r) / ramp, 0, 1)
        inter = np.minimum(win, tmpl).sum((1, 2))
        return float((inter / np.maximum(np.maximum(win, tmpl).sum((1, 2)), 1e-6)).mean())

    scores = {}
    for shape in SHAPES:
        r = np.sqrt(area / _UNIT_AREA[shape])[:, None, None]
        # Edge softness first (upright), then the tilt at that softness.
        best, ramp = max((iou(shape, r, 0.0, ramp), ramp) for ramp in _RAMPS)
        if shape != "circle":
            best = max([best] + [iou(shape, r, a, ramp) for a in _ANGLES if a != 0.0])
        scores[shape] = best
    return scores


def _fit(u: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Slope of a least-squares line through (u, y) and the std of the residual."""
    a = np.stack([u, np.ones_like(u)], 1)
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    return float(coef[0]), float(np.std(y - a @ coef))


def _motion(u, cx, cy, area, h: int, w: int) -> tuple[str | None, dict[str, float]]:
    if len(u) < 3 or u[-1] - u[0] < 0.5:
        return None, {}
    growth, _ = _fit(u, np.log(area))
    dx, _ = _fit(u, cx / w)
    dy, wobble = _fit(u, cy / h)
    span = u[-1] - u[0]
    feats = {"growth": float(np.exp(growth)), "dx": dx, "dy": dy, "wobble": wobble}
    if feats["growth"] >= GROW_RATIO:
        return "growing", feats
    if wobble >= BOUNCE_WOBBLE:
        return "bouncing", feats
    if max(abs(dx), abs(dy)) * span < STATIC_TRAVEL:
        return "static", feats
    if abs(dx) >= abs(dy):
        return ("right" if dx > 0 else "left"), feats
    return ("down" if dy > 0 else "up"), feats


def _coherent(seg: dict[str, Any], cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
    """Per-frame: exactly one sizeable object, continuous with the previous one."""
    area, second, min_area = seg["area"], seg["second"], seg["min_area"]
    f, h, w = seg["obj"].shape
    one = (area >= min_area) & (second < np.maximum(0.2 * area, min_area))
    ok = one.copy()
    prev = None
    for i in np.flatnonzero(one):
        if prev is not None:
            ratio = area[i] / area[prev]
            jump = np.hypot((cx[i] - cx[prev]) / w, (cy[i] - cy[prev]) / h) / (i - prev)
            ok[i] = 0.4 <= ratio <= 2.5 and jump <= 0.35
        prev = i
    return ok


def analyse(video: np.ndarray) -> dict[str, Any]:
    """What a uint8 [F, H, W, 3] clip shows: colour, shape, motion, background, coherence."""
    video = _check_video(video)
    f, h, w, _ = video.shape
    seg = _segment(video)
    area, cx, cy = seg["area"], seg["cx"], seg["cy"]
    present = area >= seg["min_area"]
    out: dict[str, Any] = {
        "background": _nearest(np.median(seg["bg"], 0), _BG_RGB, _BG_NAMES),
        "colour": None,
        "shape": None,
        "motion": None,
        "coherence": float(_coherent(seg, cx, cy).mean()),
        "frames_with_object": int(present.sum()),
    }
    if seg["contrast"] < MIN_CONTRAST or not present.any():
        return out
    # Colour from the object's inner pixels (well above threshold: no background mixed in).
    pix = seg["pix"][present[seg["pix"] // (h * w)]]
    inner = pix[seg["dist"].reshape(-1)[pix] >= 0.5 * (seg["thresh"] + seg["contrast"])]
    rgb = seg["v"].reshape(-1, 3)[inner if inner.size >= 4 else pix]
    out["colour"] = _nearest(np.median(rgb, 0), _OBJ_RGB, _OBJ_NAMES)
    big = np.flatnonzero(present & (area >= 0.5 * area.max()))
    pick = big[np.linspace(0, len(big) - 1, min(SHAPE_FRAMES, len(big))).round().astype(int)]
    scores = _shape_scores(seg, pick)
    out["shape"] = max(scores, key=scores.get)
    out["shape_scores"] = scores
    idx = np.flatnonzero(present)
    u = idx / max(f - 1, 1)
    out["motion"], out["motion_features"] = _motion(u, cx[idx], cy[idx], area[idx], h, w)
    return out


analyze = analyse


def object_track(video: np.ndarray) -> dict[str, np.ndarray]:
    """Per frame of a uint8 [F, H, W, 3] clip: the object's centre (cx, cy) and area in pixels,
    and whether an object is present at all (for diversity and motion statistics)."""
    seg = _segment(_check_video(video))
    return {
        "cx": seg["cx"],
        "cy": seg["cy"],
        "area": seg["area"],
        "present": seg["area"] >= seg["min_area"],
    }


def coherence(video: np.ndarray) -> float:
    """Fraction of frames showing exactly one object, continuous in size and place with the last."""
    video = _check_video(video)
    seg = _segment(video)
    return float(_coherent(seg, seg["cx"], seg["cy"]).mean())


def evaluate(video: np.ndarray, prompt: str | dict[str, Any]) -> dict[str, Any]:
    """Per-attribute correctness of a clip against its prompt (text or attribute dict).

    Returns {"colour", "shape", "motion", "background": bool or None (None when the prompt does
    not name it), "all": colour and shape and motion right, "target", "predicted"}.
    """
    target = parse_prompt(prompt) if isinstance(prompt, str) else dict(prompt)
    pred = analyse(video)
    report: dict[str, Any] = {}
    for k in ("colour", "shape", "motion", "background"):
        report[k] = None if target.get(k) is None else pred[k] == target[k]
    report["all"] = all(report[k] is True for k in ("colour", "shape", "motion"))
    report["target"] = {k: target.get(k) for k in ("colour", "shape", "motion", "background")}
    report["predicted"] = pred
    return report


def summarise(reports: list[dict[str, Any]]) -> dict[str, float]:
    """Accuracy per attribute (over reports whose prompt names it) and of all three together."""
    out = {}
    for k in ("colour", "shape", "motion", "background", "all"):
        vals = [r[k] for r in reports if r[k] is not None]
        out[k] = float(np.mean(vals)) if vals else float("nan")
    coh = [r["predicted"]["coherence"] for r in reports]
    out["coherence"] = float(np.mean(coh)) if coh else float("nan")
    return out


def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """[n, n] Gaussian blur along one axis as a matrix (edges replicated)."""
    r = max(int(np.ceil(3 * sigma)), 1)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    m = np.zeros((n, n))
    for i, wt in zip(range(-r, r + 1), k, strict=True):
        np.add.at(m, (np.arange(n), np.clip(np.arange(n) + i, 0, n - 1)), wt)
    return m.astype(np.float32)


def _blur(pm: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of pixel-major [H, W, N] frames (as two matrix products)."""
    h, w, n = pm.shape
    pm = (_blur_matrix(h, sigma) @ pm.reshape(h, w * n)).reshape(h, w, n)
    return np.matmul(_blur_matrix(w, sigma), pm)  # [W, W] @ [H, W, N], batched over H


def _warp(pm: np.ndarray, rotate_deg: float, scale_x: float, scale_y: float) -> np.ndarray:
    """Rotate and stretch pixel-major [H, W, N] frames about their centre (bilinear)."""
    h, w, n = pm.shape
    th = np.deg2rad(rotate_deg)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = xs - (w - 1) / 2, ys - (h - 1) / 2
    # Inverse map: where in the source each output pixel comes from.
    su = (np.cos(th) * u + np.sin(th) * v) / scale_x + (w - 1) / 2
    sv = (-np.sin(th) * u + np.cos(th) * v) / scale_y + (h - 1) / 2
    su, sv = np.clip(su, 0, w - 1.001), np.clip(sv, 0, h - 1.001)
    x0, y0 = su.astype(np.int64), sv.astype(np.int64)
    ax = (su - x0).astype(np.float32).reshape(-1, 1)
    ay = (sv - y0).astype(np.float32).reshape(-1, 1)
    i = (y0 * w + x0).reshape(-1)
    rows = pm.reshape(h * w, n)  # each gather copies one contiguous row per pixel
    out = (rows[i] * (1 - ax) + rows[i + 1] * ax) * (1 - ay)
    out += (rows[i + w] * (1 - ax) + rows[i + w + 1] * ax) * ay
    return out.reshape(h, w, n)


def degrade(
    video: np.ndarray,
    rng: np.random.Generator,
    blur: tuple[float, float] = (0.5, 1.2),
    noise: tuple[float, float] = (3.0, 8.0),
    gain: float = 0.12,
    offset: float = 15.0,
    rotate: float = 8.0,
    stretch: float = 0.08,
) -> np.ndarray:
    """Generated-video artefacts for robustness checks: a slight warp, blur, colour shift, noise.

    Per clip, drawn from rng: rotation in +-rotate degrees and per-axis stretch in 1 +- stretch,
    Gaussian blur sigma in `blur` pixels, per-channel gain 1 +- gain and offset +- offset, and
    zero-mean noise with standard deviation in `noise` (0..255 units).
    """
    f, h, w, c = video.shape
    pm = np.ascontiguousarray(video.transpose(1, 2, 0, 3), dtype=np.float32).reshape(h, w, f * c)
    if rotate or stretch:
        pm = _warp(pm, rng.uniform(-rotate, rotate), *rng.uniform(1 - stretch, 1 + stretch, 2))
    if blur[1] > 0:
        pm = _blur(pm, rng.uniform(*blur))
    x = pm.reshape(h, w, f, c)
    x *= rng.uniform(1 - gain, 1 + gain, 3).astype(np.float32)
    x += rng.uniform(-offset, offset, 3).astype(np.float32)
    # Triangular noise (sum of two uniforms): near-Gaussian, and ~5x cheaper to draw.
    tri = rng.random(x.shape, dtype=np.float32)
    tri += rng.random(x.shape, dtype=np.float32)
    tri -= 1.0
    x += tri * np.float32(np.sqrt(6.0) * rng.uniform(*noise))
    np.rint(x, out=x)
    np.clip(x, 0, 255, out=x)
    return x.astype(np.uint8).transpose(2, 0, 1, 3).copy()


def self_check(
    num_clips: int = 500,
    height: int = 64,
    width: int = 64,
    frames: int = 33,
    seed: int = 0,
    degraded: bool = False,
) -> dict[str, Any]:
    """The evaluator's accuracy on ground-truth clips of the shapes dataset (optionally degraded)."""
    import time

    from .shapes import ShapesDataset

    ds = ShapesDataset(height, width, frames, seed=seed)
    rng = np.random.default_rng([seed, 1])
    reports, start = [], time.perf_counter()
    for i in range(num_clips):
        video, _, attrs = ds.sample(i)
        if degraded:
            video = degrade(video, rng)
        reports.append(evaluate(video, attrs))
    out: dict[str, Any] = summarise(reports)
    out["clips"], out["seconds"] = num_clips, time.perf_counter() - start
    out["errors"] = [
        {
            "index": i,
            "target": r["target"],
            "predicted": {k: r["predicted"][k] for k in r["target"]},
        }
        for i, r in enumerate(reports)
        if not r["all"] or r["background"] is False
    ]
    return out
