"""Parity of an exported model with the eager fp32 SaliencyModel: the measurements and the verdict.

`export.run` calls `check` on every file it writes, at batch sizes 1, 3 and 64. Boxes go
through `metrics.masks_to_boxes` on both sides, the one pipeline eval and infer use. A
masks-only model has no logits: its logit figures and the argmax criterion are left out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from casm_deploy.evaluation.metrics import Box, box_iou, masks_to_boxes

BATCH_SIZES = (1, 3, 64)

# images (B, 3, H, W) float32 -> (masks (B, 1, H, W), logits (B, K) or None: masks-only),
# numpy in and out.
Predict = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]


@dataclass(frozen=True)
class Thresholds:
    """What an export must meet against eager fp32 (None: not a criterion at this precision)."""

    max_abs_mask: float | None  # max |Δmask| over every pixel of every image
    mean_abs_mask: float | None  # mean |Δmask| over every pixel of every image
    box_iou: float | None  # a box agrees when IoU > this; None: only an identical box agrees
    box_share: float  # share of the real images whose boxes must agree
    same_argmax: bool  # the logits' argmax must agree on every image (a model with logits)


THRESHOLDS: dict[str, Thresholds] = {
    "fp32": Thresholds(1e-4, None, None, 0.99, True),
    "fp16": Thresholds(2e-2, None, 0.9, 0.97, False),
    "bf16": Thresholds(2e-2, None, 0.9, 0.97, False),
    "int8": Thresholds(None, 0.03, 0.9, 0.95, False),
}


@dataclass(frozen=True)
class Reference:
    """The eager fp32 outputs on the parity images; the first `n_real` images are real ones."""

    masks: np.ndarray  # (N, 1, H, W)
    logits: np.ndarray | None  # (N, K); None for a masks-only model
    boxes: list[Box | None]  # of the real images
    n_real: int


def reference(predict: Predict, images: np.ndarray, n_real: int) -> Reference:
    """Run the eager model once (in batches of 64) and take the boxes of the real images."""
    masks, logits = run_batched(predict, images, max(BATCH_SIZES))
    return Reference(masks, logits, masks_to_boxes(masks[:n_real]), n_real)


def run_batched(
    predict: Predict, images: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """`predict` over `images` in chunks of `batch_size` (the last one may be smaller)."""
    masks, logits = [], []
    for start in range(0, len(images), batch_size):
        m, z = predict(images[start : start + batch_size])
        masks.append(np.asarray(m, dtype=np.float32))
        if z is not None:
            logits.append(np.asarray(z, dtype=np.float32))
    return np.concatenate(masks), np.concatenate(logits) if logits else None


def _agree(a: Box | None, b: Box | None, iou: float | None) -> bool:
    if a == b:  # identical, or both empty
        return True
    return iou is not None and box_iou(a, b) > iou


def _shape(array: np.ndarray | None) -> tuple[int, ...] | None:
    return None if array is None else array.shape


def compare(ref: Reference, masks: np.ndarray, logits: np.ndarray | None) -> dict[str, Any]:
    """Differences of one run's outputs from the reference: plain numbers, JSON-ready.

    Box shares are over the real images; mask and argmax figures over all images. Without
    logits (a masks-only model) there are no logit figures.
    """
    if masks.shape != ref.masks.shape or _shape(logits) != _shape(ref.logits):
        raise ValueError(
            f"outputs of shape {masks.shape}, {_shape(logits)}; expected "
            f"{ref.masks.shape}, {_shape(ref.logits)}"
        )
    diff = np.abs(masks.astype(np.float64) - ref.masks)  # (N, 1, H, W)
    boxes = masks_to_boxes(masks[: ref.n_real])
    pairs = list(zip(ref.boxes, boxes, strict=True))
    stats = {
        "max_abs_mask": float(diff.max()),
        "mean_abs_mask": float(diff.mean()),
        "boxes_identical": float(np.mean([a == b for a, b in pairs])),
        "boxes_iou_above_0.9": float(np.mean([_agree(a, b, 0.9) for a, b in pairs])),
    }
    if logits is not None and ref.logits is not None:
        stats["max_abs_logits"] = float(np.abs(logits - ref.logits).max())
        stats["argmax_agree"] = float(np.mean(logits.argmax(1) == ref.logits.argmax(1)))
    return stats


def verdict(stats: dict[str, Any], limits: Thresholds) -> list[str]:
    """The failed criteria of one run, as short sentences (empty: it passed)."""
    failures = []
    if limits.max_abs_mask is not None and not stats["max_abs_mask"] <= limits.max_abs_mask:
        failures.append(f"max |Δmask| {stats['max_abs_mask']:.3g} > {limits.max_abs_mask:g}")
    if limits.mean_abs_mask is not None and not stats["mean_abs_mask"] <= limits.mean_abs_mask:
        failures.append(f"mean |Δmask| {stats['mean_abs_mask']:.3g} > {limits.mean_abs_mask:g}")
    key = "boxes_identical" if limits.box_iou is None else "boxes_iou_above_0.9"
    if not stats[key] >= limits.box_share:
        rule = "identical boxes" if limits.box_iou is None else f"box IoU > {limits.box_iou:g}"
        failures.append(f"{rule} on {stats[key]:.1%} of real images < {limits.box_share:.0%}")
    if limits.same_argmax and stats.get("argmax_agree", 1) < 1:
        failures.append(f"argmax agrees on {stats['argmax_agree']:.1%} of images, not all")
    return failures


def check(predict: Predict, images: np.ndarray, ref: Reference, precision: str) -> dict[str, Any]:
    """Run an exported model at every batch size of `BATCH_SIZES` and judge it.

    Args:
        predict: the exported model as a numpy function.
        images: the parity images (N, 3, H, W) float32 in [0, 1], the real ones first.
        ref: the eager fp32 outputs on the same images.
        precision: fp32, fp16, bf16 or int8: which thresholds apply.

    Returns:
        dict(status="passed" | "failed", thresholds, batches={size: stats}, worst, failures).
    """
    limits = THRESHOLDS[precision]
    batches: dict[str, dict[str, Any]] = {}
    failed_at: dict[str, list[str]] = {}  # reason -> batch sizes, so each reason shows once
    for size in BATCH_SIZES:
        stats = compare(ref, *run_batched(predict, images, size))
        batches[str(size)] = stats
        for reason in verdict(stats, limits):
            failed_at.setdefault(reason, []).append(str(size))
    failures = [f"batch {', '.join(sizes)}: {reason}" for reason, sizes in failed_at.items()]
    runs = list(batches.values())
    worst = {
        key: (max if key.startswith(("max", "mean")) else min)(run[key] for run in runs)
        for key in runs[0]
    }
    return {
        "status": "failed" if failures else "passed",
        "thresholds": asdict(limits),
        "worst": worst,
        "batches": batches,
        "failures": failures,
    }
