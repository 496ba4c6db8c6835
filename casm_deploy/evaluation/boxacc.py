"""MaxBoxAccV2, the box metric the weakly supervised localisation field reports now (Choe et al.,
"Evaluating Weakly Supervised Object Localization Methods Right", CVPR 2020): pure functions.

Unlike LE, which binarises each mask at its own mean and keeps its largest component, it asks
how well the masks can localise at their best threshold: each mask, min-max normalised, is
binarised at every threshold of a grid; every connected component gives a box; an image is
right at (threshold, delta) when one of those boxes has IoU >= delta with one of its ground-truth
boxes. BoxAcc(threshold, delta) is the share of images that are right, MaxBoxAcc(delta) its best
over the thresholds, and MaxBoxAccV2 the mean of MaxBoxAcc over delta = 0.3, 0.5 and 0.7.
As the authors' code (wsolevaluation), the grid is 0, 0.01, ..., 0.99 and a pixel is kept when
it is above the threshold; components are 8-connected, as their outer contours are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from casm_deploy.evaluation.metrics import Box, box_iou, single_mask

THRESHOLDS = tuple(i / 100 for i in range(100))
IOU_THRESHOLDS = (0.3, 0.5, 0.7)


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


def best_ious(
    mask: Any, gt_boxes: Sequence[Sequence[float]], thresholds: Sequence[float] = THRESHOLDS
) -> np.ndarray:
    """For each threshold, the best IoU between a component box and a ground-truth box."""
    scores = normalize(mask)
    best = np.zeros(len(thresholds))
    for i, threshold in enumerate(thresholds):
        boxes = component_boxes(scores > threshold)
        best[i] = max((box_iou(b, g) for b in boxes for g in gt_boxes), default=0.0)
    return best


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

    def result(self) -> dict[str, float]:
        """MaxBoxAccV2, and per IoU threshold its MaxBoxAcc and the threshold that gives it."""
        if self.n == 0:
            return {"MaxBoxAccV2": float("nan")}
        accuracy = self.right / self.n  # (T, D)
        out: dict[str, float] = {}
        for j, delta in enumerate(self.iou_thresholds):
            best = int(np.argmax(accuracy[:, j]))  # the lowest threshold among ties
            out[f"MaxBoxAcc@{delta}"] = float(accuracy[best, j])
            out[f"best_threshold@{delta}"] = self.thresholds[best]
        out["MaxBoxAccV2"] = float(np.mean(accuracy.max(axis=0)))
        return out
