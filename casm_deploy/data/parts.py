"""The parts set (`data synth --parts N`, 1 to 3): objects made of parts, any one of which
identifies the class.

`render_parts` draws part 0, the class's shape, as the favourite (the largest, opaque, a
saturated colour), part 1 the class's texture patch, part 2 the class's glyph (both smaller
and of lower contrast), on `draw.py`'s clutter; the object's box is the tight box of all their
pixels. `synth.py` writes, for each validation image (training images have none):

- `parts/<stem>.png`: a uint8 label map at the image's size; 0 where no part is, k + 1 on the
  pixels at least half covered by part k;
- `parts/<stem>.json` (`part_annotation`): `{"parts": [{"name": "shape", "box": [x0, y0, x1,
  y1]}, ...], "favourite": 0}`, each present part's name (`PART_KINDS`) and tight box (as the
  XML's).

`make_parts_sample(..., drop=k)` renders the same image without part k (its pixels show the
clutter under it), for checking which parts a classifier needs.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from casm_deploy.config import SynthConfig
from casm_deploy.data.draw import (
    GEOMETRY,
    SHAPES,
    SUPERSAMPLE,
    background,
    blend,
    coverage_mask,
    draw_distractors,
    hsv_to_rgb,
    image_size,
    poly,
    polygon_alpha,
    shape_fill,
    tight_box,
)

SPLITS = {"train": 0, "val": 1}  # the split id seeds the per-image RNG (also synth.make_sample)
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
    outline, holes = GEOMETRY[shape]
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
    alpha, crop = polygon_alpha(outline, holes, (x, y, box_w, box_h), h, w)
    return alpha, crop, shape_fill(rng, *alpha.shape)


def _texture_part(
    rng: np.random.Generator, class_index: int, cell: tuple[float, float, float], h: int, w: int
) -> tuple[np.ndarray, tuple[int, int, int, int], np.ndarray]:
    """A rectangle of the class's pattern in the class's colours, inside `cell`."""
    pattern, degrees, cycles = _TEXTURES[class_index]
    cx, cy, side = cell
    box_w, box_h = side * rng.uniform(0.8, 1.0, size=2)
    x, y = cx + rng.uniform(0, side - box_w), cy + rng.uniform(0, side - box_h)
    corners = poly((x, y), (x + box_w, y), (x + box_w, y + box_h), (x, y + box_h))
    alpha, (x0, y0, x1, y1) = polygon_alpha(corners, [], (x, y, box_w, box_h), h, w)

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
    dark, light = (hsv_to_rgb(np.array([hue, saturation, v])) for v in values)
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
    colour = hsv_to_rgb(np.array([rng.uniform(0, 360), rng.uniform(0, 0.3), value]))
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
    h, w = image_size(rng, min_side, max_side)
    image = background(rng, h, w)
    draw_distractors(rng, image)
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
        blend(image, alpha * opacity, crop, fill)
        labels[coverage_mask(alpha, crop, h, w)] = k + 1
    return image, labels


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


__all__ = [
    "FAVOURITE",
    "PART_KINDS",
    "SPLITS",
    "make_parts_sample",
    "part_annotation",
    "render_parts",
]
