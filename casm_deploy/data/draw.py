"""Drawing the embedded benchmark's images: pure functions, an RNG in, pixels out.

The shape classes (polygons in unit coordinates; `SHAPES` fixes their order and so the wnids),
the cluttered background and its distractors, a polygon's exact anti-aliased coverage, and
`render`, one image of one solid shape with its pixel mask. `parts.py` builds objects of parts
from the same pieces; `synth.py` draws every image of a data set with them and writes it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

SUPERSAMPLE = 4  # objects are drawn at 4x and averaged down: exact anti-aliased coverage


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


def poly(*points: tuple[float, float]) -> np.ndarray:
    return np.asarray(points, dtype=np.float64)


_CROSS = poly(
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
_H_SHAPE = poly(
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
GEOMETRY: dict[str, tuple[np.ndarray, list[np.ndarray]]] = {
    "disk": (_ring_points(96), []),
    "triangle": (_ring_points(3), []),
    "square": (poly((-1, -1), (1, -1), (1, 1), (-1, 1)), []),
    "star": (_star(), []),
    "cross": (_CROSS, []),
    "ring": (_ring_points(96), [_ring_points(96, 0.55)]),
    "crescent": (_crescent(), []),
    "heart": (_heart(), []),
    "arrow": (
        poly((-1, -0.2), (0.15, -0.2), (0.15, -0.6), (1, 0), (0.15, 0.6), (0.15, 0.2), (-1, 0.2)),
        [],
    ),
    "L-shape": (poly((-0.7, -1), (-0.2, -1), (-0.2, 0.5), (0.7, 0.5), (0.7, 1), (-0.7, 1)), []),
    "T-shape": (
        poly(
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
    "bowtie": (poly((-1, -0.9), (0, -0.15), (1, -0.9), (1, 0.9), (0, 0.15), (-1, 0.9)), []),
    "semicircle": (_arc(0, 0, 1, 0, math.pi, 64), []),
}

SHAPES: list[str] = list(GEOMETRY)


def wnid_for(index: int) -> str:
    """The fake, ImageNet-shaped wnid of shape `index` ('n' + 8 digits), stable across subsets.

    Args:
        index: position of the shape in `SHAPES`.
    """
    return f"n{90000001 + index:08d}"


# ---------------------------------------------------------------------------------------------
# Rendering (pure: an RNG in, an RGB uint8 array and the object mask out).


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """(..., 3) hue in degrees, saturation and value in [0, 1] -> RGB float32 in [0, 1]."""
    import cv2

    shape = hsv.shape
    rgb = cv2.cvtColor(hsv.reshape(1, -1, 3).astype(np.float32), cv2.COLOR_HSV2RGB)
    return rgb.reshape(shape)


def image_size(rng: np.random.Generator, min_side: int, max_side: int) -> tuple[int, int]:
    short = int(rng.integers(min_side, max_side + 1))
    aspect = math.exp(rng.uniform(math.log(0.67), math.log(1.5)))  # w / h, log-uniform
    if aspect >= 1:
        return short, max(short, round(short * aspect))
    return max(short, round(short / aspect)), short


def background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth, low-saturation colour fields plus fine texture, as uint8 RGB (h, w, 3)."""
    import cv2

    # Large-scale colour gradients: a coarse grid of muted colours, upsampled smoothly.
    gh, gw = (int(v) for v in rng.integers(2, 6, size=2))
    hsv = np.empty((gh, gw, 3), np.float32)
    hsv[..., 0] = (rng.uniform(0, 360) + rng.normal(0, 40, (gh, gw))) % 360
    hsv[..., 1] = rng.uniform(0.0, 0.3) * rng.uniform(0.4, 1.0, (gh, gw))
    hsv[..., 2] = np.clip(rng.uniform(0.3, 0.75) + rng.uniform(-0.15, 0.15, (gh, gw)), 0.1, 0.9)
    image = cv2.resize(hsv_to_rgb(hsv), (w, h), interpolation=cv2.INTER_CUBIC)

    # Mid-frequency texture (mostly grey, a little colour) and pixel noise: not flat.
    th, tw = max(2, h // 6), max(2, w // 6)
    texture = rng.normal(0, 1, (th, tw, 1)) + 0.3 * rng.normal(0, 1, (th, tw, 3))
    texture = cv2.resize(texture.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    image = image + rng.uniform(0.02, 0.06) * texture + rng.normal(0, 0.015, (h, w, 3))
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def _muted_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    hsv = np.array([rng.uniform(0, 360), rng.uniform(0, 0.4), rng.uniform(0.1, 0.95)])
    return tuple(int(c * 255 + 0.5) for c in hsv_to_rgb(hsv))


def draw_distractors(rng: np.random.Generator, image: np.ndarray) -> None:
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
    outline, holes = GEOMETRY[shape]
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
    return polygon_alpha(outline, holes, (x, y, box_w, box_h), h, w)


def polygon_alpha(
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
    h, w = image_size(rng, min_side, max_side)
    image = background(rng, h, w)
    draw_distractors(rng, image)
    alpha, crop = _object_alpha(rng, shape, h, w, min_area, max_area)
    blend(image, alpha, crop, shape_fill(rng, *alpha.shape))
    return image, coverage_mask(alpha, crop, h, w)


def shape_fill(rng: np.random.Generator, ch: int, cw: int) -> np.ndarray:
    """A saturated fill with soft linear shading and a little noise, so it is not perfectly flat.

    Float RGB `(ch, cw, 3)`, not clipped.
    """
    colour = hsv_to_rgb(
        np.array([rng.uniform(0, 360), rng.uniform(0.45, 1.0), rng.uniform(0.5, 1.0)])
    )
    yy, xx = np.mgrid[0:ch, 0:cw].astype(np.float32)
    direction = rng.uniform(0, 2 * math.pi)
    ramp = ((xx - cw / 2) * math.cos(direction) + (yy - ch / 2) * math.sin(direction)) / max(ch, cw)
    shade = 1 + rng.uniform(0, 0.4) * ramp  # (ch, cw), about 1 +- 0.2
    return colour * shade[..., None] + rng.normal(0, 0.02, (ch, cw, 3))


def blend(
    image: np.ndarray, alpha: np.ndarray, crop: tuple[int, int, int, int], fill: np.ndarray
) -> None:
    """Composite `fill` (float RGB) over the `crop` of `image` with coverage `alpha` (in place)."""
    x0, y0, x1, y1 = crop
    under = image[y0:y1, x0:x1].astype(np.float32) / 255
    blended = under * (1 - alpha[..., None]) + np.clip(fill, 0, 1) * alpha[..., None]
    image[y0:y1, x0:x1] = (blended * 255 + 0.5).astype(np.uint8)


def coverage_mask(alpha: np.ndarray, crop: tuple[int, int, int, int], h: int, w: int) -> np.ndarray:
    """The pixels at least half covered, bool `(h, w)`; never empty (a sub-pixel object keeps
    its best-covered pixel, so that its box exists)."""
    x0, y0, x1, y1 = crop
    mask = np.zeros((h, w), bool)
    mask[y0:y1, x0:x1] = alpha >= 0.5
    if not mask.any():
        iy, ix = np.unravel_index(np.argmax(alpha), alpha.shape)
        mask[y0 + iy, x0 + ix] = True
    return mask


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """`(xmin, ymin, xmax, ymax)` of a non-empty bool mask, exclusive right/bottom edges."""
    cols = np.flatnonzero(mask.any(0))
    rows = np.flatnonzero(mask.any(1))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def synthetic_labels(wnids: Any, names: Any = ()) -> bool:
    """Whether the class ids are `data synth`'s (n900000NN, with its shape names if named)."""
    known = {wnid_for(k): shape for k, shape in enumerate(SHAPES)}
    if not isinstance(wnids, list | tuple) or not wnids:
        return False
    if not all(isinstance(w, str) and w in known for w in wnids):
        return False
    names = list(names or [])
    return not names or names == [known[w] for w in wnids]


__all__ = [
    "GEOMETRY",
    "SHAPES",
    "background",
    "blend",
    "coverage_mask",
    "draw_distractors",
    "hsv_to_rgb",
    "image_size",
    "poly",
    "polygon_alpha",
    "render",
    "shape_fill",
    "tight_box",
    "synthetic_labels",
    "wnid_for",
]
