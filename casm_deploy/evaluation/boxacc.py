"""MaxBoxAccV2, the box metric the weakly supervised localisation field reports now (Choe et al.,
"Evaluating Weakly Supervised Object Localization Methods Right", CVPR 2020): pure functions,
computed as the authors' code (clovaai/wsolevaluation) computes it with `multi_contour_eval`
and `multi_iou_eval` on, the settings of its `--box_v2_metric` (config.py).

Each mask is binarised at every threshold of a grid; every contour of a binary gives a box; an
image is right at (threshold, delta) when one of those boxes has IoU >= delta with one of its
ground-truth boxes. BoxAcc(threshold, delta) is the share of images that are right, MaxBoxAcc
(delta) its best over the thresholds (one threshold for the whole split), and MaxBoxAccV2 the
mean of MaxBoxAcc over delta = 0.3, 0.5 and 0.7. What is followed, and where it is in theirs:

- Normalising (inference.py, `normalize_scoremap`): the mask, in float64, min-max to [0, 1]; a
  constant mask, or one with a NaN, becomes all zeros.
- Thresholds (evaluation.py, `evaluate_wsol` and `main`): `np.arange(0, 1, cam_curve_interval)`
  with the interval their evaluation script defaults to and documents, 0.01: 0, 0.01, ...,
  0.99 (their training script's config.py defaults to 0.001).
- Binarising (evaluation.py, `compute_bboxes_from_scoremaps`): the map is quantised to uint8,
  u = int(255 * s), and a pixel is kept at threshold t where u > int(t * max(u)), with
  max(u) = 255 unless the map is all zeros. So a pixel whose score is above t by less than the
  rounding of both to 1/255 is dropped: 0.501 is not kept at t = 0.5 (127 > 127 fails).
- Boxes (same function): every contour that `cv2.findContours(binary, RETR_TREE,
  CHAIN_APPROX_SIMPLE)` finds, outer borders and the borders of holes alike, gives its
  `cv2.boundingRect` (x, y, w, h) as [x, y, x + w, y + h], with x + w clipped to W - 1 and
  y + h to H - 1. A hole's border runs on the kept pixels around it, so its box is the hole's
  grown by one pixel on each side. A binary with no contour gives the one box [0, 0, 0, 0].
- IoU (evaluation.py, `calculate_multiple_iou`): boxes count as inclusive pixel boxes, area
  (x1 - x0 + 1) * (y1 - y0 + 1), the intersection likewise (0 where empty).
- Ground truth (data_loaders.py, `get_bounding_boxes`; evaluation.py, `resize_bbox`): theirs is
  [x0, y0, x0 + w, y0 + h] (CUB's x, y, w, h as x, y, x + w, y + h), scaled to the model's size
  and truncated to int. This project's boxes, [x0, y0, x1, y1] in pixels of the model frame
  with exclusive right / bottom edges, truncated to int by `transform_box`, are the same
  convention, so they enter unchanged: a mask that is exactly a box away from the right and
  bottom edges gives back that box, IoU 1.0. They are not clipped to the frame (under the
  centre crop a box may extend outside it; their resize to 224 x 224 never does).

A box is right at delta when its IoU >= delta; the accuracies here are shares (theirs are
percentages).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from casm_deploy.evaluation.metrics import Box, single_mask

# Their grid, np.arange(0, 1, 0.01), value for value (it is not always i / 100).
THRESHOLDS = tuple(float(t) for t in np.arange(0, 1, 0.01))
IOU_THRESHOLDS = (0.3, 0.5, 0.7)
# What eval reports of `BoxAccMeter.result()`: the mean, and MaxBoxAcc at each IoU threshold.
KEYS = ("MaxBoxAccV2", *(f"MaxBoxAcc@{delta}" for delta in IOU_THRESHOLDS))
# Their box for a binary with no contour (an inclusive box of the top-left pixel).
NO_BOX = (0, 0, 0, 0)


def normalize(mask: Any) -> np.ndarray:
    """One (H, W) mask min-max normalised to [0, 1] in float64, as `normalize_scoremap`: a
    constant mask, or one with a NaN, becomes all zeros."""
    mask = single_mask(mask)[0]  # float64, as their t2n gives it
    if np.isnan(mask).any() or mask.min() == mask.max():
        return np.zeros_like(mask)
    mask = mask - mask.min()
    return mask / mask.max()


def quantize(scores: np.ndarray) -> np.ndarray:
    """Normalised scores in [0, 1] as their uint8 score map: int(255 * s), truncated."""
    return (np.asarray(scores, dtype=np.float64) * 255).astype(np.uint8)


def levels(quantized: np.ndarray, thresholds: Sequence[float] = THRESHOLDS) -> np.ndarray:
    """The uint8 level of each threshold: a pixel is kept where its value is above it.

    `int(t * max)` as `cv2.threshold` is called in theirs; max is 255 for a normalised map
    with any spread, 0 for the zeros of a constant one (which then keeps nothing).
    """
    top = int(quantized.max())
    return np.array([int(float(t) * top) for t in thresholds], dtype=np.int64)


def block_size(values: np.ndarray) -> int:
    """The largest k (a power of 2) such that `values` is constant on k x k blocks, else 1.

    A mask upsampled nearest from a k times smaller one (the decoder's default) has, on the
    small grid, the same components and holes as on the full one: its contours are found on
    the small grid for 1/k^2 of the work, and their boxes scaled up (`tile_boxes`).
    """
    height, width = values.shape
    k = 1
    while height % (2 * k) == 0 and width % (2 * k) == 0:
        small = values[:: 2 * k, :: 2 * k]
        if not np.array_equal(np.repeat(np.repeat(small, 2 * k, 0), 2 * k, 1), values):
            break
        k *= 2
    return k


def tile_boxes(
    tiles: np.ndarray, k: int = 1, height: int | None = None, width: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Their boxes of a stack of non-empty binaries (N, h, w): each contour's binary index and
    its box [x, y, x + w, y + h] clipped to W - 1 / H - 1, as two arrays (C,) and (C, 4).

    The binaries may be on a grid k times smaller than the (height, width) mask (default: the
    same grid). They are traced in one call, stacked with an empty row between them: no
    contour crosses it, and a region of zeros that touches a binary's edge is outside there as
    it is alone (the image's edge counts as zeros).
    """
    import cv2

    n, h, w = tiles.shape
    height, width = height or h * k, width or w * k
    stack = np.zeros((n, h + 1, w), np.uint8)
    stack[:, :h] = tiles
    # RETR_CCOMP finds the same contours as their RETR_TREE; its two-level hierarchy tells a
    # hole's border (it has a parent) from an outer one, which the block scaling needs.
    contours, hierarchy = cv2.findContours(
        stack.reshape(-1, w), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE
    )
    # cv2.boundingRect of each contour, for all at once: from the least to the greatest point.
    starts = np.cumsum([0, *map(len, contours[:-1])])
    points = np.concatenate(contours).reshape(-1, 2).astype(np.int64)
    low = np.minimum.reduceat(points, starts, axis=0)
    high = np.maximum.reduceat(points, starts, axis=0) + 1
    tile, low[:, 1] = np.divmod(low[:, 1], h + 1)
    high[:, 1] -= tile * (h + 1)
    if k > 1:
        # An outer border's box is its component's: k times larger on the full grid. A hole's
        # is the hole's box grown by one pixel: shrink it back on the small grid, scale the
        # hole up, grow it by one full-grid pixel.
        hole = (hierarchy.reshape(-1, 4)[:, 3] >= 0)[:, None]
        low = np.where(hole, k * (low + 1) - 1, k * low)
        high = np.where(hole, k * (high - 1) + 1, k * high)
    high = np.minimum(high, [width - 1, height - 1])  # their clipping of x + w and y + h
    return tile, np.concatenate([low, high], axis=1)


def contour_boxes(binary: Any) -> list[Box]:
    """Their boxes of one (H, W) binary: one per contour, outer borders and holes' borders,
    [x, y, x + w, y + h] clipped to W - 1 / H - 1; [[0, 0, 0, 0]] when nothing is kept."""
    binary = np.asarray(binary).astype(bool)
    if not binary.any():
        return [list(NO_BOX)]
    return tile_boxes(binary[None])[1].tolist()


def box_ious(boxes: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """(N, G) IoUs of N boxes with G boxes as `calculate_multiple_iou`: inclusive pixel boxes,
    each side + 1; 0 where the union is not positive."""
    a, g = boxes[:, None].astype(np.float64), gt_boxes[None].astype(np.float64)
    inter = np.maximum(0, np.minimum(a[..., 2], g[..., 2]) - np.maximum(a[..., 0], g[..., 0]) + 1)
    inter *= np.maximum(0, np.minimum(a[..., 3], g[..., 3]) - np.maximum(a[..., 1], g[..., 1]) + 1)
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_g = (g[..., 2] - g[..., 0] + 1) * (g[..., 3] - g[..., 1] + 1)
    union = area_a + area_g - inter
    valid = union > 0
    return np.where(valid, inter / np.where(valid, union, 1.0), 0.0)


def best_ious(
    mask: Any, gt_boxes: Sequence[Sequence[float]], thresholds: Sequence[float] = THRESHOLDS
) -> np.ndarray:
    """For each threshold, the best IoU between one of its boxes and a ground-truth box.

    The binaries are nested (a higher level keeps a subset of the pixels), so two with as many
    pixels are the same: each distinct one is traced once, on the coarsest grid the quantised
    map is constant on (`block_size`).

    Raises:
        ValueError: a ground-truth box has x1 < x0 or y1 < y0 (their check refuses it too).
    """
    quantized = quantize(normalize(mask))
    height, width = quantized.shape
    gt = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    if (gt[:, 2] < gt[:, 0]).any() or (gt[:, 3] < gt[:, 1]).any():
        raise ValueError(f"ground-truth boxes must be [x0, y0, x1, y1], x0 <= x1, y0 <= y1: {gt}")
    if not len(gt):
        return np.zeros(len(thresholds))
    level = levels(quantized, thresholds)
    # Pixels kept at each level: those of value above it.
    above = np.cumsum(np.bincount(quantized.ravel(), minlength=256)[::-1])[::-1]
    kept = np.append(above[1:], 0)[level]
    distinct, first, which = np.unique(kept, return_index=True, return_inverse=True)
    # A binary with no pixel has their one box [0, 0, 0, 0].
    per_distinct = np.full(len(distinct), box_ious(np.array([NO_BOX]), gt).max())
    traced = distinct > 0
    if traced.any():
        k = block_size(quantized)
        tiles = quantized[None, ::k, ::k] > level[first[traced]][:, None, None]
        tile, boxes = tile_boxes(tiles, k, height, width)
        per_tile = np.zeros(len(tiles))
        np.maximum.at(per_tile, tile, box_ious(boxes, gt).max(axis=1))
        per_distinct[traced] = per_tile
    return per_distinct[which.reshape(-1)]


class BoxAccMeter:
    """Streams images in, MaxBoxAcc at each IoU threshold and MaxBoxAccV2 out."""

    def __init__(
        self,
        thresholds: Sequence[float] = THRESHOLDS,
        iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
    ):
        self.thresholds, self.iou_thresholds = tuple(thresholds), tuple(iou_thresholds)
        self.right = np.zeros((len(self.thresholds), len(self.iou_thresholds)), dtype=np.int64)
        self.n = 0

    def add(self, mask: Any, gt_boxes: Sequence[Sequence[float]]) -> None:
        ious = best_ious(mask, gt_boxes, self.thresholds)  # (T,)
        self.right += ious[:, None] >= np.asarray(self.iou_thresholds)[None, :]
        self.n += 1

    def result(self) -> dict[str, float | None]:
        """MaxBoxAccV2, and per IoU threshold its MaxBoxAcc and the threshold that gives it
        (all None before any image)."""
        if self.n == 0:
            keys = [
                f"{k}@{d}" for d in self.iou_thresholds for k in ("MaxBoxAcc", "best_threshold")
            ]
            return dict.fromkeys([*keys, "MaxBoxAccV2"])
        accuracy = self.right / self.n  # (T, D)
        out: dict[str, float | None] = {}
        for j, delta in enumerate(self.iou_thresholds):
            best = int(np.argmax(accuracy[:, j]))  # the lowest threshold among ties
            out[f"MaxBoxAcc@{delta}"] = float(accuracy[best, j])
            out[f"best_threshold@{delta}"] = self.thresholds[best]
        out["MaxBoxAccV2"] = float(np.mean(accuracy.max(axis=0)))
        return out
