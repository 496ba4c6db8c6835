"""PxAP, the pixel metric of Choe et al. ("Evaluating Weakly Supervised Object Localization
Methods Right", CVPR 2020), where ground-truth pixel masks exist: pure functions.

Every pixel of the split is a prediction: its mask value, min-max normalised per image (as the
authors' code, wsolevaluation, normalises each score map), is its score, and the ground-truth
mask says whether it is object. At each threshold t of the grid 0, 0.01, ..., 0.99 and at 1.0,
the pixels with score >= t are called object: precision and recall over all pixels of the
split, pooled (not a mean over images). PxAP is the area under that precision-recall curve as
their `MaskEvaluator` sums it: from the highest threshold down, each threshold's precision
times the recall it adds, starting from recall 0.

The meter only keeps two histograms of scores (object and background pixels), so the split
streams through in bounded memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from casm_deploy.evaluation.boxacc import THRESHOLDS, normalize


def bin_edges(thresholds: Sequence[float] = THRESHOLDS) -> np.ndarray:
    """The histogram edges of a threshold grid in [0, 1): the grid, then 1, 2 and 3.

    The bins are [t_0, t_1), ..., [0.99, 1), [1, 2) and [2, 3], as the authors' are: the last
    two hold the scores of exactly 1, and none.
    """
    return np.asarray([*thresholds, 1.0, 2.0, 3.0], dtype=np.float64)


def score_histograms(
    mask: Any, truth: Any, thresholds: Sequence[float] = THRESHOLDS
) -> tuple[np.ndarray, np.ndarray]:
    """Histograms of one image's normalised scores over its object and background pixels.

    `mask`: (H, W) scores; `truth`: (H, W), true on the object's pixels.
    """
    scores = normalize(mask)
    truth = np.asarray(truth, dtype=bool)
    if truth.shape != scores.shape:
        raise ValueError(f"mask {scores.shape} and ground truth {truth.shape} differ in size")
    edges = bin_edges(thresholds)
    bins = np.searchsorted(edges, scores, side="right") - 1  # score in [edges[b], edges[b+1])
    n = len(edges) - 1
    return np.bincount(bins[truth], minlength=n), np.bincount(bins[~truth], minlength=n)


def average_precision(object_hist: np.ndarray, background_hist: np.ndarray) -> float | None:
    """PxAP from the two histograms; None when no pixel is object (recall is undefined)."""
    # Pixels at or above each bin's left edge, from the highest edge down.
    tp = np.cumsum(np.asarray(object_hist, dtype=np.float64)[::-1])
    fp = np.cumsum(np.asarray(background_hist, dtype=np.float64)[::-1])
    if tp[-1] <= 0:
        return None
    called = tp + fp
    precision = np.divide(tp, called, out=np.zeros_like(tp), where=called > 0)
    recall = tp / tp[-1]
    # The top bin ([2, 3]) holds no score: recall starts at 0 there.
    return float(np.sum(precision[1:] * np.diff(recall)))


class PxAPMeter:
    """Streams (mask, ground-truth mask) pairs in, PxAP over all their pixels out."""

    def __init__(self, thresholds: Sequence[float] = THRESHOLDS):
        self.thresholds = tuple(thresholds)
        n = len(self.thresholds) + 2
        self.object_hist = np.zeros(n, dtype=np.int64)
        self.background_hist = np.zeros(n, dtype=np.int64)
        self.n = 0

    def add(self, mask: Any, truth: Any) -> None:
        object_hist, background_hist = score_histograms(mask, truth, self.thresholds)
        self.object_hist += object_hist
        self.background_hist += background_hist
        self.n += 1

    def result(self) -> dict[str, float | None]:
        """{"PxAP": the area under the pooled precision-recall curve, or None with no image
        or no object pixel}."""
        return {"PxAP": average_precision(self.object_hist, self.background_hist)}
