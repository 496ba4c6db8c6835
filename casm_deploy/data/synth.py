"""The embedded benchmark: a deterministic generator of an ImageNet-layout data set on disk.

First step of the flow: `generate` writes `train/<wnid>/*.JPEG`, `val/<wnid>/*.JPEG` and
`annotations/<stem>.xml` (ILSVRC/PASCAL VOC boxes) that `data.py` / `dali.py` then load. Boxes
are ILSVRC pixel coordinates of the tight box of the object's drawn pixels (coverage >= 0.5):
xmin, ymin inclusive, xmax, ymax EXCLUSIVE (last column / row + 1), as `[x0, y0, x1, y1]`.

With `parts` (`--parts N`, 1 to 3) each object is made of parts, any one of which identifies
the class (`render_parts`): part 0 the class's shape, the favourite (the largest, opaque, a
saturated colour), part 1 the class's texture patch, part 2 the class's glyph (both smaller
and of lower contrast). The box is the tight box of all their pixels. Each validation image
then has two sidecar files (training images have none):

- `parts/<stem>.png`: a uint8 label map at the image's size; 0 where no part is, k + 1 on the
  pixels at least half covered by part k;
- `parts/<stem>.json`: `{"parts": [{"name": "shape", "box": [x0, y0, x1, y1]}, ...],
  "favourite": 0}`, each present part's name (`PART_KINDS`) and tight box (as the XML's).

`make_parts_sample(..., drop=k)` renders the same image without part k (its pixels show the
clutter under it), for checking which parts a classifier needs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from casm_deploy.config import SynthConfig, config_to_dict
from casm_deploy.errors import UserError

SPLITS = {"train": 0, "val": 1}  # the split id seeds the per-image RNG
MARKER = ".synth-incomplete"  # present while a run is writing; synth.json is written last
OWNED = ("train", "val", "annotations", "parts", "classes.txt", "synth.json", MARKER)
IGNORED_KEYS = ("out", "workers", "overwrite")  # config keys that do not change the content
SUPERSAMPLE = 4  # objects are drawn at 4x and averaged down: exact anti-aliased coverage
JPEG_QUALITY = 90


# ---------------------------------------------------------------------------------------------
# Shapes: polygons in unit coordinates (y down); only the bounding box of the outline matters.


def _ring_points(n: int, r: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    t = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _arc(cx: float, cy: float, r: float, a0: float, a1: float, n: int) -> np.ndarray:
    t = np.linspace(a0, a1, n)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)


def _star(points: int = 5, inner: float = 0.42) -> np.ndarray:
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    t = -math.pi / 2 + math.pi * np.arange(2 * points) / points
    return np.stack([radii * np.cos(t), radii * np.sin(t)], 1)


def _crescent(d: float = 0.5, r2: float = 0.85) -> np.ndarray:
    # Inside the unit circle, outside a circle of radius r2 centred at (d, 0).
    x = (1 - r2**2 + d**2) / (2 * d)  # where the two circles cross (the horns)
    y = math.sqrt(1 - x**2)
    a, b = math.atan2(y, x), math.atan2(y, x - d)
    outer = _arc(0, 0, 1, a, 2 * math.pi - a, 64)  # the far side of the outer circle
    inner = _arc(d, 0, r2, 2 * math.pi - b, b, 48)  # back along the near side of the inner one
    return np.concatenate([outer, inner])


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 96, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y], 1) / 17


def _poly(*points: tuple[float, float]) -> np.ndarray:
    return np.asarray(points, dtype=np.float64)


_CROSS = _poly(
    (-0.3, -1),
    (0.3, -1),
    (0.3, -0.3),
    (1, -0.3),
    (1, 0.3),
    (0.3, 0.3),
    (0.3, 1),
    (-0.3, 1),
    (-0.3, 0.3),
    (-1, 0.3),
    (-1, -0.3),
    (-0.3, -0.3),
)
_H_SHAPE = _poly(
    (-1, -1),
    (-0.5, -1),
    (-0.5, -0.22),
    (0.5, -0.22),
    (0.5, -1),
    (1, -1),
    (1, 1),
    (0.5, 1),
    (0.5, 0.22),
    (-0.5, 0.22),
    (-0.5, 1),
    (-1, 1),
)

# name -> (outline, holes). Chosen to stay distinct under any rotation and at ~20 px: no
# square/diamond or disk/ellipse/hexagon pairs. Order fixes the wnids: append, never reorder.
_GEOMETRY: dict[str, tuple[np.ndarray, list[np.ndarray]]] = {
    "disk": (_ring_points(96), []),
    "triangle": (_ring_points(3), []),
    "square": (_poly((-1, -1), (1, -1), (1, 1), (-1, 1)), []),
    "star": (_star(), []),
    "cross": (_CROSS, []),
    "ring": (_ring_points(96), [_ring_points(96, 0.55)]),
    "crescent": (_crescent(), []),
    "heart": (_heart(), []),
    "arrow": (
        _poly((-1, -0.2), (0.15, -0.2), (0.15, -0.6), (1, 0), (0.15, 0.6), (0.15, 0.2), (-1, 0.2)),
        [],
    ),
    "L-shape": (_poly((-0.7, -1), (-0.2, -1), (-0.2, 0.5), (0.7, 0.5), (0.7, 1), (-0.7, 1)), []),
    "T-shape": (
        _poly(
            (-1, -1),
            (1, -1),
            (1, -0.5),
            (0.25, -0.5),
            (0.25, 1),
            (-0.25, 1),
            (-0.25, -0.5),
            (-1, -0.5),
        ),
        [],
    ),
    "H-shape": (_H_SHAPE, []),
    "bowtie": (_poly((-1, -0.9), (0, -0.15), (1, -0.9), (1, 0.9), (0, 0.15), (-1, 0.9)), []),
    "semicircle": (_arc(0, 0, 1, 0, math.pi, 64), []),
}

SHAPES: list[str] = list(_GEOMETRY)


def wnid_for(index: int) -> str:
    """The fake, ImageNet-shaped wnid of shape `index` ('n' + 8 digits), stable across subsets.

    Args:
        index: position of the shape in `SHAPES`.
    """
    return f"n{90000001 + index:08d}"


# ---------------------------------------------------------------------------------------------
# Rendering (pure: an RNG in, an RGB uint8 array and the object mask out).


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """(..., 3) hue in degrees, saturation and value in [0, 1] -> RGB float32 in [0, 1]."""
    import cv2

    shape = hsv.shape
    rgb = cv2.cvtColor(hsv.reshape(1, -1, 3).astype(np.float32), cv2.COLOR_HSV2RGB)
    return rgb.reshape(shape)


def _image_size(rng: np.random.Generator, min_side: int, max_side: int) -> tuple[int, int]:
    short = int(rng.integers(min_side, max_side + 1))
    aspect = math.exp(rng.uniform(math.log(0.67), math.log(1.5)))  # w / h, log-uniform
    if aspect >= 1:
        return short, max(short, round(short * aspect))
    return max(short, round(short / aspect)), short


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth, low-saturation colour fields plus fine texture, as uint8 RGB (h, w, 3)."""
    import cv2

    # Large-scale colour gradients: a coarse grid of muted colours, upsampled smoothly.
    gh, gw = (int(v) for v in rng.integers(2, 6, size=2))
    hsv = np.empty((gh, gw, 3), np.float32)
    hsv[..., 0] = (rng.uniform(0, 360) + rng.normal(0, 40, (gh, gw))) % 360
    hsv[..., 1] = rng.uniform(0.0, 0.3) * rng.uniform(0.4, 1.0, (gh, gw))
    hsv[..., 2] = np.clip(rng.uniform(0.3, 0.75) + rng.uniform(-0.15, 0.15, (gh, gw)), 0.1, 0.9)
    image = cv2.resize(_hsv_to_rgb(hsv), (w, h), interpolation=cv2.INTER_CUBIC)

    # Mid-frequency texture (mostly grey, a little colour) and pixel noise: not flat.
    th, tw = max(2, h // 6), max(2, w // 6)
    texture = rng.normal(0, 1, (th, tw, 1)) + 0.3 * rng.normal(0, 1, (th, tw, 3))
    texture = cv2.resize(texture.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    image = image + rng.uniform(0.02, 0.06) * texture + rng.normal(0, 0.015, (h, w, 3))
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def _muted_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    hsv = np.array([rng.uniform(0, 360), rng.uniform(0, 0.4), rng.uniform(0.1, 0.95)])
    return tuple(int(c * 255 + 0.5) for c in _hsv_to_rgb(hsv))


def _draw_distractors(rng: np.random.Generator, image: np.ndarray) -> None:
    """Clutter that is not an object: thin lines, dots, small blobs, partial arcs (in place)."""
    import cv2

    h, w = image.shape[:2]
    short = min(h, w)
    aa = cv2.LINE_AA
    for _ in range(rng.integers(0, 4)):  # thin lines
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        length, angle = rng.uniform(0.15, 0.5) * short, rng.uniform(0, 2 * math.pi)
        p0 = (round(x), round(y))
        p1 = (round(x + length * math.cos(angle)), round(y + length * math.sin(angle)))
        cv2.line(image, p0, p1, _muted_colour(rng), 1, aa)
    for _ in range(rng.integers(0, 7)):  # dots
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        radius = max(1, round(rng.uniform(0.008, 0.02) * short))
        cv2.circle(image, centre, radius, _muted_colour(rng), -1, aa)
    for _ in range(rng.integers(0, 3)):  # small irregular blobs
        n = 7
        t = np.sort(rng.uniform(0, 2 * math.pi, n))
        r = rng.uniform(0.03, 0.07) * short * rng.uniform(0.5, 1.0, n)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        points = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)
        cv2.fillPoly(image, [np.round(points).astype(np.int32)], _muted_colour(rng), aa)
    for _ in range(rng.integers(0, 3)):  # partial arcs
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = tuple(int(a) for a in np.maximum(2, rng.uniform(0.05, 0.15, 2) * short))
        start = rng.uniform(0, 360)
        end = start + rng.uniform(60, 200)
        angle = rng.uniform(0, 360)
        cv2.ellipse(image, centre, axes, angle, start, end, _muted_colour(rng), 1, aa)


def _object_alpha(
    rng: np.random.Generator, shape: str, h: int, w: int, min_area: float, max_area: float
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Coverage in [0, 1] of a randomly rotated, scaled and placed shape.

    Returns the coverage of the crop `(x0, y0, x1, y1)` of the image that holds the object.
    """
    outline, holes = _GEOMETRY[shape]
    angle = rng.uniform(0, 2 * math.pi)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    outline = outline @ rotation.T
    holes = [hole @ rotation.T for hole in holes]
    lo = outline.min(0)
    size = outline.max(0) - lo  # (width, height) of the rotated outline

    # Scale so the box covers the drawn fraction of the image, clamped to fit with a 1 px margin.
    fraction = rng.uniform(min_area, max_area)
    scale = math.sqrt(fraction * h * w / (size[0] * size[1]))
    scale = min(scale, (w - 2) / size[0], (h - 2) / size[1])
    box_w, box_h = size * scale
    # max(): rounding can leave the range a hair below zero when the object just fits.
    x = rng.uniform(1, max(1.0, w - 1 - box_w))
    y = rng.uniform(1, max(1.0, h - 1 - box_h))

    outline, holes = (outline - lo) * scale + (x, y), [(p - lo) * scale + (x, y) for p in holes]
    return _polygon_alpha(outline, holes, (x, y, box_w, box_h), h, w)


def _polygon_alpha(
    outline: np.ndarray,
    holes: list[np.ndarray],
    box: tuple[float, float, float, float],
    h: int,
    w: int,
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Coverage of a polygon in image coordinates whose outline spans `box` `(x, y, w, h)`.

    Returns the coverage of the crop `(x0, y0, x1, y1)` around the box (1 px margin).
    """
    import cv2

    # Draw only the crop around the box, at SUPERSAMPLE x, then average down to coverage.
    x, y, box_w, box_h = box
    x0, y0 = max(0, math.floor(x) - 1), max(0, math.floor(y) - 1)
    x1, y1 = min(w, math.ceil(x + box_w) + 1), min(h, math.ceil(y + box_h) + 1)
    s = SUPERSAMPLE
    canvas = np.zeros(((y1 - y0) * s, (x1 - x0) * s), np.uint8)

    def to_canvas(image_xy: np.ndarray) -> np.ndarray:
        # cv2 puts pixel centres on integers; 4 fractional bits (shift=4) keep sub-pixel detail.
        return np.round(((image_xy - (x0, y0)) * s - 0.5) * 16).astype(np.int32)

    cv2.fillPoly(canvas, [to_canvas(outline)], 255, cv2.LINE_8, 4)
    for hole in holes:
        cv2.fillPoly(canvas, [to_canvas(hole)], 0, cv2.LINE_8, 4)
    small = cv2.resize(canvas, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
    return small.astype(np.float32) / 255, (x0, y0, x1, y1)


def render(
    rng: np.random.Generator,
    shape: str,
    min_side: int = 80,
    max_side: int = 128,
    min_area: float = 0.1,
    max_area: float = 0.6,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one image holding one object of class `shape` on a cluttered background.

    Args:
        rng: the image's own generator (the only source of randomness).
        shape: a name from `SHAPES`.
        min_side: smallest shorter side, pixels.
        max_side: largest shorter side, pixels.
        min_area: smallest object box area, as a fraction of the image area.
        max_area: largest object box area (clamped so the object fits).

    Returns:
        `(image, mask)`: RGB uint8 `(H, W, 3)` and the object's pixel mask, bool `(H, W)`:
        the pixels at least half covered by the object.
    """
    h, w = _image_size(rng, min_side, max_side)
    image = _background(rng, h, w)
    _draw_distractors(rng, image)
    alpha, crop = _object_alpha(rng, shape, h, w, min_area, max_area)
    _blend(image, alpha, crop, _shape_fill(rng, *alpha.shape))
    return image, _coverage_mask(alpha, crop, h, w)


def _shape_fill(rng: np.random.Generator, ch: int, cw: int) -> np.ndarray:
    """A saturated fill with soft linear shading and a little noise, so it is not perfectly flat.

    Float RGB `(ch, cw, 3)`, not clipped.
    """
    colour = _hsv_to_rgb(
        np.array([rng.uniform(0, 360), rng.uniform(0.45, 1.0), rng.uniform(0.5, 1.0)])
    )
    yy, xx = np.mgrid[0:ch, 0:cw].astype(np.float32)
    direction = rng.uniform(0, 2 * math.pi)
    ramp = ((xx - cw / 2) * math.cos(direction) + (yy - ch / 2) * math.sin(direction)) / max(ch, cw)
    shade = 1 + rng.uniform(0, 0.4) * ramp  # (ch, cw), about 1 +- 0.2
    return colour * shade[..., None] + rng.normal(0, 0.02, (ch, cw, 3))


def _blend(
    image: np.ndarray, alpha: np.ndarray, crop: tuple[int, int, int, int], fill: np.ndarray
) -> None:
    """Composite `fill` (float RGB) over the `crop` of `image` with coverage `alpha` (in place)."""
    x0, y0, x1, y1 = crop
    under = image[y0:y1, x0:x1].astype(np.float32) / 255
    blended = under * (1 - alpha[..., None]) + np.clip(fill, 0, 1) * alpha[..., None]
    image[y0:y1, x0:x1] = (blended * 255 + 0.5).astype(np.uint8)


def _coverage_mask(
    alpha: np.ndarray, crop: tuple[int, int, int, int], h: int, w: int
) -> np.ndarray:
    """The pixels at least half covered, bool `(h, w)`; never empty (a sub-pixel object keeps
    its best-covered pixel, so that its box exists)."""
    x0, y0, x1, y1 = crop
    mask = np.zeros((h, w), bool)
    mask[y0:y1, x0:x1] = alpha >= 0.5
    if not mask.any():
        iy, ix = np.unravel_index(np.argmax(alpha), alpha.shape)
        mask[y0 + iy, x0 + ix] = True
    return mask


# ---------------------------------------------------------------------------------------------
# Objects made of parts (`--parts N`): any one part identifies the class, one part is easiest.

PART_KINDS = ("shape", "texture", "glyph")  # part k of every class is of kind PART_KINDS[k]
FAVOURITE = 0  # the easiest part: the largest, drawn opaque in a saturated colour
# Side of the other parts' cells, as a fraction of the favourite's. The balance is fine: at
# 0.6-0.68 the experiments' small classifier learns the shape alone, and at 0.75 or more
# (blended at 0.9 or opaque) the texture becomes its cue instead (issue 15's closing note).
PART_SIDE = 0.6
PART_GAP = 0.12  # gap between cells, as a fraction of the favourite's side (at least MIN_GAP)
MIN_GAP = 3.0  # pixels: coverage spills a pixel past a cell; two pixels stay empty between parts
PART_OPACITY = 0.75  # the other parts are blended over the clutter: lower contrast

# Class k's texture: (pattern, stripe angle in degrees, cycles across the patch), in two shades
# of a random hue. Class k's glyph: _GLYPHS[k]. Both tables follow SHAPES'
# order. Glyphs avoid letters that look like a shape class (H, L, T, O, X, ...).
_TEXTURES = [
    ("stripes", 0, 2.0),
    ("stripes", 90, 2.0),
    ("checks", 0, 2.0),
    ("stripes", 45, 2.0),
    ("stripes", 135, 2.0),
    ("stripes", 0, 3.5),
    ("stripes", 90, 3.5),
    ("checks", 45, 2.0),
    ("stripes", 45, 3.5),
    ("stripes", 135, 3.5),
    ("checks", 0, 3.5),
    ("checks", 45, 3.5),
    ("zigzag", 0, 2.5),
    ("zigzag", 90, 2.5),
]
_GLYPHS = "AKMRWY247E5G?3"


def _layout(
    rng: np.random.Generator, n: int, h: int, w: int, min_area: float, max_area: float
) -> list[tuple[float, float, float]]:
    """Square cells `(x, y, side)` of the parts, the favourite's first, disjoint with a gap.

    The favourite's cell sits beside a column (or above a row) of the others' smaller cells;
    the union of the cells covers a drawn fraction of the image, as a solid shape's box does.
    """
    small, gap = PART_SIDE, PART_GAP
    # Extent of the layout along the stack (long) and across it (deep), per unit favourite side.
    long = max(1.0, (n - 1) * small + (n - 2) * gap) if n > 1 else 1.0
    deep = 1 + gap + small if n > 1 else 1.0
    horizontal = rng.uniform() < 0.5  # the others' stack beside the favourite (else below)
    span_x, span_y = (deep, long) if horizontal else (long, deep)
    fraction = rng.uniform(min_area, max_area)
    side = math.sqrt(fraction * h * w / (span_x * span_y))
    side = min(side, (w - 2) / span_x, (h - 2) / span_y)
    gap = max(MIN_GAP, gap * side) if n > 1 else 0.0
    small *= side
    stack = (n - 1) * small + (n - 2) * gap if n > 1 else 0.0
    long_px = max(side, stack)
    size_x, size_y = (side + gap + small, long_px) if horizontal else (long_px, side + gap + small)
    # max(): the cells may just fit (or, for a tiny image, not quite: they are clipped).
    x = rng.uniform(1, max(1.0, w - 1 - size_x))
    y = rng.uniform(1, max(1.0, h - 1 - size_y))
    first = rng.uniform() < 0.5  # the favourite on the left (top) or on the right (bottom)
    fav_along = rng.uniform(0, long_px - side)  # slack along the stack
    stack_along = rng.uniform(0, long_px - stack) if n > 1 else 0.0
    fav_across, stack_across = (0.0, side + gap) if first else (small + gap, 0.0)
    offsets = [(fav_across, fav_along)]
    offsets += [(stack_across, stack_along + j * (small + gap)) for j in range(n - 1)]
    cells = []
    for j, (across, along) in enumerate(offsets):
        dx, dy = (across, along) if horizontal else (along, across)
        cells.append((x + dx, y + dy, side if j == 0 else small))
    order = [0, *(1 + rng.permutation(n - 1))]  # which of the others' cells each part takes
    return [cells[order.index(k)] for k in range(n)]


def _shape_part(
    rng: np.random.Generator, shape: str, cell: tuple[float, float, float], h: int, w: int
) -> tuple[np.ndarray, tuple[int, int, int, int], np.ndarray]:
    """The class's shape, rotated and scaled into `cell`: coverage, crop and fill."""
    outline, holes = _GEOMETRY[shape]
    angle = rng.uniform(0, 2 * math.pi)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    outline = outline @ rotation.T
    holes = [hole @ rotation.T for hole in holes]
    lo = outline.min(0)
    size = outline.max(0) - lo
    cx, cy, side = cell
    scale = side * rng.uniform(0.85, 1.0) / size.max()
    box_w, box_h = size * scale
    x = cx + rng.uniform(0, side - box_w)
    y = cy + rng.uniform(0, side - box_h)
    outline, holes = (outline - lo) * scale + (x, y), [(p - lo) * scale + (x, y) for p in holes]
    alpha, crop = _polygon_alpha(outline, holes, (x, y, box_w, box_h), h, w)
    return alpha, crop, _shape_fill(rng, *alpha.shape)


def _texture_part(
    rng: np.random.Generator, class_index: int, cell: tuple[float, float, float], h: int, w: int
) -> tuple[np.ndarray, tuple[int, int, int, int], np.ndarray]:
    """A rectangle of the class's pattern in the class's colours, inside `cell`."""
    pattern, degrees, cycles = _TEXTURES[class_index]
    cx, cy, side = cell
    box_w, box_h = side * rng.uniform(0.8, 1.0, size=2)
    x, y = cx + rng.uniform(0, side - box_w), cy + rng.uniform(0, side - box_h)
    corners = _poly((x, y), (x + box_w, y), (x + box_w, y + box_h), (x, y + box_h))
    alpha, (x0, y0, x1, y1) = _polygon_alpha(corners, [], (x, y, box_w, box_h), h, w)

    # The pattern in the patch's own coordinates, so that its stripes scale with it.
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    theta = math.radians(degrees)
    u = ((xx - x) * math.cos(theta) + (yy - y) * math.sin(theta)) / max(box_w, box_h)
    v = (-(xx - x) * math.sin(theta) + (yy - y) * math.cos(theta)) / max(box_w, box_h)
    phase = rng.uniform(0, 2 * math.pi)
    if pattern == "zigzag":  # stripes bent by a triangle wave along them
        u = u + 0.12 * np.abs((v * 2 * cycles) % 2 - 1)
    wave = np.sin(2 * math.pi * cycles * u + phase)
    if pattern == "checks":
        wave = wave * np.sin(2 * math.pi * cycles * v)
    t = np.clip(3 * wave, -1, 1)[..., None] * 0.5 + 0.5  # a soft square wave in [0, 1]
    # A hue of the image's own: a class-specific colour was a cue easier than any shape.
    hue, saturation = rng.uniform(0, 360), rng.uniform(0.1, 0.45)
    values = np.array([0.42, 0.68]) + rng.uniform(-0.05, 0.05, size=2)
    dark, light = (_hsv_to_rgb(np.array([hue, saturation, v])) for v in values)
    fill = dark * (1 - t) + light * t + rng.normal(0, 0.02, (*t.shape[:2], 3))
    return alpha, (x0, y0, x1, y1), fill


def _glyph_part(
    rng: np.random.Generator,
    class_index: int,
    cell: tuple[float, float, float],
    clutter: np.ndarray,
) -> tuple[np.ndarray, tuple[int, int, int, int], np.ndarray]:
    """The class's character in a colour that stands out from the clutter under it."""
    import cv2

    h, w = clutter.shape[:2]
    cx, cy, side = cell
    s = SUPERSAMPLE
    target = side * rng.uniform(0.75, 0.95) * s  # ink height on the supersampled canvas
    font = cv2.FONT_HERSHEY_SIMPLEX
    thickness = max(1, round(target / 7))
    _, base_h = cv2.getTextSize("A", font, 1.0, thickness)[0]
    scale = target / base_h
    (tw, th), baseline = cv2.getTextSize(_GLYPHS[class_index], font, scale, thickness)
    pad = 2 * thickness
    canvas = np.zeros((th + baseline + 2 * pad, tw + 2 * pad), np.uint8)
    org = (pad, pad + th)
    cv2.putText(canvas, _GLYPHS[class_index], org, font, scale, 255, thickness, cv2.LINE_AA)
    rows, cols = np.flatnonzero(canvas.any(1)), np.flatnonzero(canvas.any(0))
    ink = canvas[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    # Fit the ink into the cell (a wide character is shrunk), in whole pixels of the image.
    fit = min(1.0, side * s / max(ink.shape))
    gw, gh = max(1, round(ink.shape[1] * fit / s)), max(1, round(ink.shape[0] * fit / s))
    alpha = cv2.resize(ink, (gw, gh), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    x0 = min(w - gw, max(0, round(cx + rng.uniform(0, max(0.0, side - gw)))))
    y0 = min(h - gh, max(0, round(cy + rng.uniform(0, max(0.0, side - gh)))))
    crop = (x0, y0, x0 + gw, y0 + gh)
    alpha = alpha[: h - y0, : w - x0]  # only for an image smaller than the glyph

    # Darker than light clutter, lighter than dark: visible whatever the background, but with
    # less contrast than the favourite's saturated colour.
    under = clutter[y0 : y0 + gh, x0 : x0 + gw].astype(np.float32).mean() / 255
    step = rng.uniform(0.3, 0.4)
    value = under - step if under > 0.5 else under + step
    colour = _hsv_to_rgb(np.array([rng.uniform(0, 360), rng.uniform(0, 0.3), value]))
    fill = colour + rng.normal(0, 0.02, (*alpha.shape, 3))
    return alpha, crop, fill


def render_parts(
    rng: np.random.Generator,
    class_index: int,
    parts: int = 3,
    min_side: int = 80,
    max_side: int = 128,
    min_area: float = 0.1,
    max_area: float = 0.6,
    drop: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one image holding one object of class `class_index` made of `parts` parts.

    Part k is of kind `PART_KINDS[k]` (the shape `SHAPES[class_index]`, the class's texture,
    the class's glyph); part `FAVOURITE` is the largest and is drawn opaque, the others at
    `PART_OPACITY`. Every part is drawn from the same draws whether or not it is `drop`ped, so
    an image without part k is this image with part k's pixels showing the clutter under it.

    Args:
        rng: the image's own generator (the only source of randomness).
        class_index: position of the class in `SHAPES`.
        parts: how many parts, 1 to `len(PART_KINDS)`.
        min_side, max_side, min_area, max_area: as `render`; the area is that of the union of
            the parts' cells.
        drop: a part to leave out, or None.

    Returns:
        `(image, labels)`: RGB uint8 `(H, W, 3)` and uint8 `(H, W)`: 0 where no part is, k + 1
        on the pixels at least half covered by part k (none for the dropped part).
    """
    h, w = _image_size(rng, min_side, max_side)
    image = _background(rng, h, w)
    _draw_distractors(rng, image)
    clutter = image.copy()  # what the glyph's colour is chosen against, whatever is dropped
    cells = _layout(rng, parts, h, w, min_area, max_area)
    drawn = [
        _shape_part(rng, SHAPES[class_index], cells[0], h, w),
        _texture_part(rng, class_index, cells[1], h, w) if parts > 1 else None,
        _glyph_part(rng, class_index, cells[2], clutter) if parts > 2 else None,
    ][:parts]
    labels = np.zeros((h, w), np.uint8)
    for k, (alpha, crop, fill) in enumerate(drawn):
        if k == drop:
            continue
        opacity = 1.0 if k == FAVOURITE else PART_OPACITY
        _blend(image, alpha * opacity, crop, fill)
        labels[_coverage_mask(alpha, crop, h, w)] = k + 1
    return image, labels


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """`(xmin, ymin, xmax, ymax)` of a non-empty bool mask, exclusive right/bottom edges."""
    cols = np.flatnonzero(mask.any(0))
    rows = np.flatnonzero(mask.any(1))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def make_parts_sample(
    cfg: SynthConfig, split: str, class_index: int, i: int, drop: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Image `i` of class `class_index` in `split` of a `cfg.parts > 0` set, and its part labels.

    `drop`: leave part k out (its pixels show the clutter under it; the rest of the image is
    unchanged), to test whether a classifier needs it.

    Returns:
        `(image, labels)` as `render_parts`.
    """
    if not 1 <= cfg.parts <= len(PART_KINDS):
        raise ValueError(f"parts must be in [1, {len(PART_KINDS)}], not {cfg.parts}")
    if drop is not None and not (0 <= drop < cfg.parts and cfg.parts > 1):
        raise ValueError(f"cannot drop part {drop} of an object of {cfg.parts} part(s)")
    rng = np.random.default_rng([cfg.seed, SPLITS[split], class_index, i])
    return render_parts(
        rng, class_index, cfg.parts, cfg.min_side, cfg.max_side, cfg.min_area, cfg.max_area, drop
    )


def part_annotation(labels: np.ndarray, parts: int) -> dict[str, Any]:
    """The `parts/<stem>.json` record of a label map: each present part's name and box."""
    listed = [
        {"name": PART_KINDS[k], "box": list(tight_box(labels == k + 1))}
        for k in range(parts)
        if (labels == k + 1).any()
    ]
    return {"parts": listed, "favourite": FAVOURITE}


def make_sample(
    cfg: SynthConfig, split: str, shape_index: int, i: int, drop: int | None = None
) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """The image and boxes of image `i` of shape `shape_index` in `split` (deterministic).

    With `cfg.parts`, the object is made of parts (`make_parts_sample`, which `drop` is passed
    to) and its box is the tight box of all their pixels.

    Returns:
        `(image, boxes)`: RGB uint8 `(H, W, 3)` (W doubled when `cfg.copies == 2`) and one box
        per object copy (only the left one when `cfg.right == "clutter"`).
    """
    if cfg.parts:
        image, labels = make_parts_sample(cfg, split, shape_index, i, drop)
        return image, [tight_box(labels > 0)]
    if drop is not None:
        raise ValueError("drop needs an object made of parts (cfg.parts > 0)")
    rng = np.random.default_rng([cfg.seed, SPLITS[split], shape_index, i])
    image, mask = render(
        rng, SHAPES[shape_index], cfg.min_side, cfg.max_side, cfg.min_area, cfg.max_area
    )
    boxes = [tight_box(mask)]
    if cfg.copies == 2 and cfg.right == "clutter":  # the object on the left only
        h, w = image.shape[:2]
        # A generator of its own (the trailing 1), so the left half is the same image as with
        # --right copy.
        clutter_rng = np.random.default_rng([cfg.seed, SPLITS[split], shape_index, i, 1])
        right = _background(clutter_rng, h, w)
        _draw_distractors(clutter_rng, right)
        image = np.concatenate([image, right], axis=1)
    elif cfg.copies == 2:  # the paper's duplicated-object check: the same content twice
        w = image.shape[1]
        x0, y0, x1, y1 = boxes[0]
        boxes.append((x0 + w, y0, x1 + w, y1))
        image = np.concatenate([image, image], axis=1)
    return image, boxes


# ---------------------------------------------------------------------------------------------
# Writing the data set.


def _annotation_xml(stem: str, wnid: str, width: int, height: int, boxes: list) -> str:
    objects = "".join(
        f"\t<object>\n\t\t<name>{wnid}</name>\n\t\t<pose>Unspecified</pose>\n"
        "\t\t<truncated>0</truncated>\n\t\t<difficult>0</difficult>\n\t\t<bndbox>\n"
        f"\t\t\t<xmin>{x0}</xmin>\n\t\t\t<ymin>{y0}</ymin>\n"
        f"\t\t\t<xmax>{x1}</xmax>\n\t\t\t<ymax>{y1}</ymax>\n\t\t</bndbox>\n\t</object>\n"
        for x0, y0, x1, y1 in boxes
    )
    return (
        f"<annotation>\n\t<folder>val</folder>\n\t<filename>{stem}</filename>\n"
        "\t<source>\n\t\t<database>casm-deploy synth</database>\n\t</source>\n"
        f"\t<size>\n\t\t<width>{width}</width>\n\t\t<height>{height}</height>\n"
        "\t\t<depth>3</depth>\n\t</size>\n\t<segmented>0</segmented>\n"
        f"{objects}</annotation>\n"
    )


def _write_items(cfg: SynthConfig, items: list[tuple[str, int, int, str]]) -> int:
    """Render and write `(split, shape_index, i, stem)` items; returns how many."""
    import cv2

    out = Path(cfg.out)
    for split, shape_index, i, stem in items:
        wnid = wnid_for(shape_index)
        if cfg.parts:
            image, labels = make_parts_sample(cfg, split, shape_index, i)
            boxes = [tight_box(labels > 0)]
        else:
            image, boxes = make_sample(cfg, split, shape_index, i)
        ok, jpeg = cv2.imencode(
            ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
        )
        assert ok, "JPEG encoding failed"
        (out / split / wnid / f"{stem}.JPEG").write_bytes(jpeg.tobytes())
        if split == "val":
            h, w = image.shape[:2]
            xml = _annotation_xml(stem, wnid, w, h, boxes)
            (out / "annotations" / f"{stem}.xml").write_text(xml)
        if split == "val" and cfg.parts:  # lossless PNG: labels must stay labels
            ok, png = cv2.imencode(".png", labels)
            assert ok, "PNG encoding failed"
            (out / "parts" / f"{stem}.png").write_bytes(png.tobytes())
            record = json.dumps(part_annotation(labels, cfg.parts))
            (out / "parts" / f"{stem}.json").write_text(record + "\n")
    return len(items)


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core already; no nested thread pools


def _write_chunk(args: tuple[SynthConfig, list]) -> int:
    return _write_items(*args)


def resolve_config(cfg: SynthConfig) -> SynthConfig:
    """Validate `cfg` and resolve its classes to readable names (`num_classes` to match).

    Raises:
        UserError: a value out of range or an unknown class name.
    """
    if cfg.classes:
        lookup = {name.lower(): k for k, name in enumerate(SHAPES)}
        lookup.update({wnid_for(k): k for k in range(len(SHAPES))})
        unknown = [c for c in cfg.classes if c.lower() not in lookup]
        if unknown:
            valid = ", ".join(f"{name} ({wnid_for(k)})" for k, name in enumerate(SHAPES))
            raise UserError(f"unknown class(es) {', '.join(unknown)}; valid classes: {valid}")
        indices = sorted({lookup[c.lower()] for c in cfg.classes})
    else:
        if not 1 <= cfg.num_classes <= len(SHAPES):
            raise UserError(f"--num-classes must be in [1, {len(SHAPES)}], not {cfg.num_classes}")
        indices = list(range(cfg.num_classes))
    if cfg.train_per_class < 1 or cfg.val_per_class < 1:
        raise UserError(
            "--train-per-class and --val-per-class must be at least 1, "
            f"not {cfg.train_per_class} and {cfg.val_per_class}"
        )
    if not 16 <= cfg.min_side <= cfg.max_side:
        raise UserError(
            f"need 16 <= --min-side <= --max-side, got {cfg.min_side} and {cfg.max_side}"
        )
    if not 0 < cfg.min_area <= cfg.max_area <= 0.9:
        raise UserError(
            f"need 0 < --min-area <= --max-area <= 0.9, got {cfg.min_area} and {cfg.max_area}"
        )
    if cfg.copies not in (1, 2):
        raise UserError(f"--copies must be 1 or 2, not {cfg.copies}")
    if cfg.right not in ("copy", "clutter"):
        raise UserError(f"--right must be copy or clutter, not {cfg.right!r}")
    if cfg.right == "clutter" and cfg.copies != 2:
        raise UserError("--right clutter needs --copies 2 (it replaces the right-hand copy)")
    if not 0 <= cfg.parts <= len(PART_KINDS):
        raise UserError(f"--parts must be in [0, {len(PART_KINDS)}], not {cfg.parts}")
    if cfg.parts and cfg.copies != 1:
        raise UserError("--parts needs --copies 1 (its part annotations describe one object)")
    if cfg.seed < 0:
        raise UserError(f"--seed must be non-negative, not {cfg.seed}")
    names = tuple(SHAPES[k] for k in indices)
    return dataclasses.replace(cfg, classes=names, num_classes=len(names))


def _record(cfg: SynthConfig) -> dict[str, Any]:
    """The config as synth.json records it: `parts` only when set, so that a set of solid
    shapes is recorded (and recognised) as before the setting existed."""
    values = config_to_dict(cfg)
    if not values["parts"]:
        del values["parts"]
    return values


def _content_key(cfg: SynthConfig) -> dict[str, Any]:
    return {k: v for k, v in _record(cfg).items() if k not in IGNORED_KEYS}


def _summary(cfg: SynthConfig, seconds: float, generated: bool) -> dict[str, Any]:
    indices = [SHAPES.index(name) for name in cfg.classes]
    n = len(indices)
    return {
        "out": str(cfg.out),
        "counts": {"train": n * cfg.train_per_class, "val": n * cfg.val_per_class},
        "classes": {wnid_for(k): SHAPES[k] for k in indices},
        "seconds": round(seconds, 3),
        "generated": generated,
    }


def _check_existing(cfg: SynthConfig) -> bool:
    """True when `cfg.out` already holds this data set; clears our old output when allowed.

    Raises:
        UserError: the folder holds a different data set, or files that are not ours, and
            `cfg.overwrite` is off.
    """
    out = Path(cfg.out)
    if not out.exists():
        return False
    if not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    done = out / "synth.json"
    if done.exists() and not cfg.overwrite:
        try:
            old = json.loads(done.read_text())["config"]
        except (ValueError, KeyError, TypeError):
            old = None
        if isinstance(old, dict):
            # A setting added since that set was made (e.g. `right`) has its default there.
            old = {**_record(SynthConfig()), **old}
        if isinstance(old, dict) and {
            k: v for k, v in old.items() if k not in IGNORED_KEYS
        } == _content_key(cfg):
            return True
        raise UserError(
            f"{out} already holds a synthetic data set with a different config; "
            "pass --overwrite to replace it, or choose another folder"
        )
    # An interrupted run of ours (the marker, no synth.json) is simply redone.
    ours = done.exists() or (out / MARKER).exists()
    if not ours and any(out.iterdir()) and not cfg.overwrite:
        raise UserError(
            f"{out} is not empty and holds no synth.json (not a synthetic data set); "
            "pass --overwrite to write into it anyway (only train/, val/, annotations/, "
            "parts/, classes.txt and synth.json are replaced), or choose another folder"
        )
    for name in OWNED:  # only what we write; never anything else in the folder
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    return False


def generate(cfg: SynthConfig, progress: bool = True) -> dict[str, Any]:
    """Write the synthetic ImageNet-layout data set described by `cfg` under `cfg.out`.

    The same config (seed included) gives byte-identical files whatever `cfg.workers` is. When
    `cfg.out/synth.json` already records the same content, nothing is written.

    Args:
        cfg: what to generate and where.
        progress: show a progress bar.

    Returns:
        A summary: `out`, `counts` per split, `classes` (wnid -> name), `seconds`, and
        `generated` (False when the existing set was kept).

    Raises:
        UserError: an invalid config, or an output folder that holds something else.
    """
    start = time.perf_counter()
    cfg = resolve_config(cfg)
    if _check_existing(cfg):
        if progress:
            print(f"{cfg.out} already holds this data set; nothing to do")
        return _summary(cfg, time.perf_counter() - start, generated=False)

    out = Path(cfg.out)
    indices = [SHAPES.index(name) for name in cfg.classes]
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("generation in progress\n")
    (out / "annotations").mkdir()
    if cfg.parts:
        (out / "parts").mkdir()
    for k in indices:
        (out / "train" / wnid_for(k)).mkdir(parents=True)
        (out / "val" / wnid_for(k)).mkdir(parents=True)
    lines = "".join(f"{wnid_for(k)} {SHAPES[k]}\n" for k in indices)
    (out / "classes.txt").write_text(lines)

    items = [
        ("train", k, i, f"{wnid_for(k)}_{i:05d}")
        for k in indices
        for i in range(cfg.train_per_class)
    ]
    for pos, k in enumerate(indices):  # val stems: one running, 1-based number over the split
        for i in range(cfg.val_per_class):
            items.append(("val", k, i, f"ILSVRC2012_val_{pos * cfg.val_per_class + i + 1:08d}"))
    _run(cfg, items, progress)

    summary = _summary(cfg, time.perf_counter() - start, generated=True)
    record = {"config": _record(cfg), "counts": summary["counts"]}
    record["classes"] = summary["classes"]
    tmp = out / "synth.json.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, out / "synth.json")  # written last and atomically: its presence = complete
    (out / MARKER).unlink()
    return summary


def _run(cfg: SynthConfig, items: list, progress: bool) -> None:
    """Render `items`, in chunks, in-process or over a pool of `cfg.workers` processes."""
    import multiprocessing

    from casm_deploy.common.ui import progress as progress_bar

    workers = max(1, cfg.workers)
    size = max(1, min(200, len(items) // (workers * 8)))
    chunks = [(cfg, items[j : j + size]) for j in range(0, len(items), size)]
    bar = progress_bar(disable=not progress)
    with bar:
        task = bar.add_task("synth", total=len(items), info="")
        if workers == 1:
            for chunk in chunks:
                bar.advance(task, _write_chunk(chunk))
            return
        # spawn, not fork: a forked child can inherit a locked OpenCV / OpenMP thread pool.
        context = multiprocessing.get_context("spawn")
        with context.Pool(workers, initializer=_init_worker) as pool:
            for done in pool.imap_unordered(_write_chunk, chunks):
                bar.advance(task, done)


__all__ = [
    "FAVOURITE",
    "PART_KINDS",
    "SHAPES",
    "generate",
    "make_parts_sample",
    "make_sample",
    "part_annotation",
    "render",
    "render_parts",
    "resolve_config",
    "tight_box",
    "wnid_for",
]
