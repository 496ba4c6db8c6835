"""MaxBoxAccV2, the box metric the weakly supervised localisation field reports now (Choe et al.,
"Evaluating Weakly Supervised Object Localization Methods Right", CVPR 2020): pure functions.

Unlike LE, which binarises each mask at its own mean and keeps its largest component, it asks
how well the masks can localise at their best threshold: each mask, min-max normalised, is
binarised at every threshold of a grid; every connected component gives a box; an image is
right at (threshold, delta) when one of those boxes has IoU >= delta with one of its ground-truth
boxes. BoxAcc(threshold, delta) is the share of images that are right, MaxBoxAcc(delta) its best
over the thresholds, and MaxBoxAccV2 the mean of MaxBoxAcc over delta = 0.3, 0.5 and 0.7.
As the authors' code (wsolevaluation) with its documented `--cam_curve_interval 0.01` (its
training script defaults to 0.001), the grid is 0, 0.01, ..., 0.99 and a pixel is kept when it
is above the threshold; components are 8-connected, as their outer contours are. A constant
mask normalises to zeros and so finds no box, as theirs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from casm_deploy.evaluation.metrics import Box, single_mask

THRESHOLDS = tuple(i / 100 for i in range(100))
IOU_THRESHOLDS = (0.3, 0.5, 0.7)
# What eval reports of `BoxAccMeter.result()`: the mean, and MaxBoxAcc at each IoU threshold.
KEYS = ("MaxBoxAccV2", *(f"MaxBoxAcc@{delta}" for delta in IOU_THRESHOLDS))


def normalize(mask: Any) -> np.ndarray:
    """One (H, W) mask min-max normalised to [0, 1]; a constant mask becomes all zeros."""
    mask = single_mask(mask)[0]
    low, high = float(mask.min()), float(mask.max())
    if high <= low:
        return np.zeros_like(mask)
    return (mask - low) / (high - low)


def component_boxes(binary: Any) -> list[Box]:
    """The tight box (exclusive right/bottom edges) of every 8-connected component."""
    import cv2

    binary = np.asarray(binary).astype(np.uint8)
    if not binary.any():
        return []
    n, _, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    x, y = stats[1:, cv2.CC_STAT_LEFT], stats[1:, cv2.CC_STAT_TOP]
    w, h = stats[1:, cv2.CC_STAT_WIDTH], stats[1:, cv2.CC_STAT_HEIGHT]
    return [[int(a), int(b), int(a + c), int(b + d)] for a, b, c, d in zip(x, y, w, h, strict=True)]


def _areas(boxes: np.ndarray) -> np.ndarray:
    """Areas of boxes (..., 4) with exclusive edges; 0 where degenerate."""
    return np.clip(boxes[..., 2] - boxes[..., 0], 0, None) * np.clip(
        boxes[..., 3] - boxes[..., 1], 0, None
    )


def box_ious(boxes: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """(N, G) IoUs of N boxes with G boxes, as `metrics.box_iou` gives them one by one."""
    a, g = boxes[:, None].astype(np.float64), gt_boxes[None].astype(np.float64)
    overlap = np.concatenate(
        [np.maximum(a[..., :2], g[..., :2]), np.minimum(a[..., 2:], g[..., 2:])], -1
    )
    inter, area_a, area_g = _areas(overlap), _areas(a), _areas(g)
    valid = (area_a > 0) & (area_g > 0)  # an empty box has IoU 0 with anything
    return np.where(valid, inter / np.where(valid, area_a + area_g - inter, 1.0), 0.0)


def block_size(scores: np.ndarray) -> int:
    """The largest k (a power of 2) such that `scores` is constant on k x k blocks, else 1.

    A mask upsampled nearest from a k times smaller one (the decoder's default) has the same
    8-connected components on the small grid, with boxes k times smaller: labelling the small
    grid gives the same boxes for 1/k^2 of the work.
    """
    height, width = scores.shape
    k = 1
    while height % (2 * k) == 0 and width % (2 * k) == 0:
        small = scores[:: 2 * k, :: 2 * k]
        if not np.array_equal(np.repeat(np.repeat(small, 2 * k, 0), 2 * k, 1), scores):
            break
        k *= 2
    return k


def best_ious(
    mask: Any, gt_boxes: Sequence[Sequence[float]], thresholds: Sequence[float] = THRESHOLDS
) -> np.ndarray:
    """For each threshold, the best IoU between a component box and a ground-truth box.

    The binaries are nested (a higher threshold keeps a subset of the pixels), so two with as
    many pixels are the same: each distinct one is labelled once, all of them together
    (`tile_boxes`), on the coarsest grid the mask is constant on (`block_size`).
    """
    scores = normalize(mask)
    k = block_size(scores)
    binaries = scores[::k, ::k][None] > np.asarray(thresholds, dtype=np.float64)[:, None, None]
    gt = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    counts = binaries.sum(axis=(1, 2))
    distinct, first, which = np.unique(counts, return_index=True, return_inverse=True)
    kept = distinct > 0  # an empty binary has no box: IoU 0
    per_distinct = np.zeros(len(distinct))
    if kept.any() and len(gt):
        tile, boxes = tile_boxes(binaries[first[kept]])
        per_tile = np.zeros(int(kept.sum()))
        np.maximum.at(per_tile, tile, box_ious(boxes * k, gt).max(axis=1))
        per_distinct[kept] = per_tile
    return per_distinct[which.reshape(-1)]


def tile_boxes(tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every 8-connected component of a stack of non-empty binaries (N, H, W): its binary's
    index and its box (exclusive right/bottom edges), as two arrays (C,) and (C, 4).

    The binaries are labelled in one pass, stacked with an empty row between them (no
    component crosses it). A binary of one component has the tight box of its pixels, read off
    its row and column projections; only the others are labelled again with statistics, which
    cost several times the labelling.
    """
    import cv2

    n, height, width = tiles.shape
    stack = np.zeros((n, height + 1, width), np.uint8)
    stack[:, :height] = tiles
    _, labels = cv2.connectedComponents(stack.reshape(-1, width), connectivity=8)
    # Labels run in raster order: each binary's come after the previous binary's.
    single = np.diff(labels.reshape(n, -1).max(axis=1), prepend=0) == 1
    rows, cols = tiles[single].any(axis=2), tiles[single].any(axis=1)
    first_row, first_col = rows.argmax(axis=1), cols.argmax(axis=1)
    end_row, end_col = height - rows[:, ::-1].argmax(axis=1), width - cols[:, ::-1].argmax(axis=1)
    indices = [np.flatnonzero(single)]
    boxes = [np.stack([first_col, first_row, end_col, end_row], 1)]
    if not single.all():
        several = stack[~single].reshape(-1, width)
        _, _, stats, _ = cv2.connectedComponentsWithStats(several, connectivity=8)
        stats = stats[1:].astype(np.int64)  # label 0 is the background
        which, top = np.divmod(stats[:, cv2.CC_STAT_TOP], height + 1)
        left = stats[:, cv2.CC_STAT_LEFT]
        right, bottom = left + stats[:, cv2.CC_STAT_WIDTH], top + stats[:, cv2.CC_STAT_HEIGHT]
        indices.append(np.flatnonzero(~single)[which])
        boxes.append(np.stack([left, top, right, bottom], 1))
    return np.concatenate(indices), np.concatenate(boxes).astype(np.int64)


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
