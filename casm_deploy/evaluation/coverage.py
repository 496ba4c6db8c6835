"""How one mask covers the two copies or the parts of an object: pure functions, no I/O.

For the data of `data synth --copies 2` and `--parts` (paper §2.1): eval adds these scores
(`meters.Copies`, `meters.Parts`) to LE / OM / F1. The binary mask is the one LE starts from
(`metrics.binarize_at_mean`), before the largest component is taken.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from casm_deploy.evaluation.metrics import binarize_at_mean, clip_box, single_mask


def copy_coverage(mask: Any, boxes: Sequence[Sequence[float]]) -> tuple[float, bool]:
    """How one mask covers the two copies of a two-copies image (paper §2.1, synth --copies 2).

    The mass of a copy is the sum of the continuous mask inside its box (clipped to the frame).
    The binary mask is the one LE starts from: binarised at the mask's mean (`binarize_at_mean`),
    before the largest component is taken (that would keep one copy by construction).

    Args:
        mask: (H,W) continuous mask in [0, 1] (a leading channel of 1 is accepted).
        boxes: the two copies' boxes, in the mask's frame.

    Returns:
        `(lighter_share, touches_both)`: the lighter copy's share of the two copies' mass
        (0.5: both equally; 0.0 also when neither has any), and whether the binary mask has at
        least one pixel inside each box.

    Raises:
        ValueError: when there are not exactly two boxes.
    """
    if len(boxes) != 2:
        raise ValueError(f"copy_coverage needs exactly two boxes, got {len(boxes)}")
    m = single_mask(mask)[0]  # (H,W) float64
    height, width = m.shape
    binary = binarize_at_mean(m)
    masses, touched = [], []
    for box in boxes:
        x0, y0, x1, y1 = (int(v) for v in clip_box(box, width, height))
        masses.append(float(m[y0:y1, x0:x1].sum()))
        touched.append(bool(binary[y0:y1, x0:x1].any()))
    total = sum(masses)
    share = min(masses) / total if total > 0 else 0.0
    return share, all(touched)


class PartCoverage(NamedTuple):
    """`part_coverage`'s result for one image."""

    touched: float  # fraction of the object's parts the binary mask touches
    all_touched: bool  # whether it touches every one
    share_least: float  # the least-covered part's share of the mask mass on parts
    n_parts: int  # the parts counted: those with at least one pixel in the frame


def part_coverage(mask: Any, labels: Any) -> PartCoverage | None:
    """How one mask covers the parts of an object (synth --parts); `copy_coverage` for n parts.

    A part's pixels are those of its label in the part label map (0: no part, k + 1: part k),
    brought to the mask's frame (`transforms.transform_labels`). As in `copy_coverage`, the binary
    mask is the one LE starts from, binarised at the mask's mean (`binarize_at_mean`), before
    the largest component is taken; it *touches* a part when at least one of its pixels is one
    of the part's pixels (the part's own pixels, not its box, which may overlap another part).
    A part's *weight* is the mean of the continuous mask over its pixels, so parts of different
    sizes compare fairly: a mask of ones gives every part the same weight.

    Only the parts with at least one pixel in the frame count: a part that the centre crop cuts
    away entirely (or, rarely, one too thin to survive nearest-neighbour downsampling) is left
    out of this image's fractions.

    Args:
        mask: (H,W) continuous mask in [0, 1] (a leading channel of 1 is accepted).
        labels: (H,W) non-negative integer label map in the mask's frame.

    Returns:
        `PartCoverage(touched, all_touched, share_least, n_parts)`: share_least is the weight
        of the least-covered part over the sum of the counted parts' weights (1/n: all n
        equally; 0: one part gets nothing, also when no part gets any; 1 with a single part).
        None when no part is in the frame.

    Raises:
        ValueError: when the label map is not of the mask's shape or has negative labels.
    """
    m = single_mask(mask)[0]  # (H,W) float64
    labels = np.asarray(labels)
    if labels.shape != m.shape:
        raise ValueError(f"label map of shape {labels.shape} for a mask of shape {m.shape}")
    flat = labels.reshape(-1).astype(np.intp)
    if flat.size and flat.min() < 0:
        raise ValueError("part labels must be non-negative")
    binary = binarize_at_mean(m)
    # Per label: pixel count, mask sum and binary pixels; label 0 (no part) is dropped.
    pixels = np.bincount(flat)[1:]
    n = len(pixels) + 1
    mass = np.bincount(flat, weights=m.reshape(-1), minlength=n)[1:]
    hits = np.bincount(flat, weights=binary.reshape(-1), minlength=n)[1:]
    present = pixels > 0
    if not present.any():
        return None
    weight, touched = mass[present] / pixels[present], hits[present] > 0
    total = float(weight.sum())
    share = float(weight.min()) / total if total > 0 else 0.0
    return PartCoverage(float(touched.mean()), bool(touched.all()), share, int(present.sum()))
