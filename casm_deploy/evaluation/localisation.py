"""The localisation loop over a batch of masks: LE / OM / F1 and mask statistics.

Training's validation (`training.train.evaluate`) and eval's meters
(`meters.Localisation`) both score their batches here: each mask is binarised at its mean,
its largest component boxed (`metrics.masks_to_boxes`) and scored against the image's own
boxes, so the two print the same numbers for the same masks. `center_baseline` scores the
reference's centre box on the same boxes (the first line of a run's metrics.jsonl).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from casm_deploy.evaluation.metrics import (
    LocalizationMeter,
    MaskStats,
    center_box,
    localization_scores,
    masks_to_boxes,
)


def score_masks(
    masks: torch.Tensor,
    gt_boxes: Sequence[list[list[int]]],
    correct: Sequence[bool | None],
    meter: LocalizationMeter,
    stats: MaskStats,
) -> np.ndarray:
    """Add one batch to `meter` (LE / OM / F1 / F1a) and `stats` (area, entropy, TV).

    `masks`: (B, 1, H, W) in the model frame; `gt_boxes`: each image's boxes of its own class;
    `correct`: each image's top-1 correctness for OM (None: not known, left out of OM).
    Returns the masks as a (B, H, W) float32 array, for any further per-image scores.
    """
    masks_np = masks[:, 0].float().cpu().numpy()
    score_localisation(masks_np, gt_boxes, correct, meter)
    stats.update(masks)
    return masks_np


def score_localisation(
    masks: np.ndarray,
    gt_boxes: Sequence[list[list[int]]],
    correct: Sequence[bool | None],
    meter: LocalizationMeter,
) -> None:
    """Add one batch's LE / OM / F1 / F1a to `meter`: each (H, W) mask of `masks` (B, H, W),
    boxed (`masks_to_boxes`) and scored against its image's own boxes."""
    boxes = masks_to_boxes(masks)
    for mask, box, gt, ok in zip(masks, boxes, gt_boxes, correct, strict=True):
        scores = localization_scores(mask, box, gt)
        meter.update(scores["hit"], scores["f1"], scores["f1a"], ok)


def center_baseline(boxes: list, image_size: int) -> dict:
    """LE / F1 of the reference's centre box (a 33/224 border) on the same validation boxes."""
    box = center_box(image_size, image_size)
    mask = np.zeros((image_size, image_size), dtype=np.float32)
    mask[box[1] : box[3], box[0] : box[2]] = 1.0
    meter = LocalizationMeter()
    for gt in boxes:
        scores = localization_scores(mask, box, gt)
        meter.update(scores["hit"], scores["f1"], scores["f1a"], None)
    result = meter.result()
    return {"val_LE": result["LE"], "val_F1": result["F1"], "val_F1a": result["F1a"]}
