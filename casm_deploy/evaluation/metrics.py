"""Pure metric functions: masks and boxes in, numbers out, no I/O.

Used by train validation, eval, export parity and infer: binarise a mask at its mean, keep the
largest connected component, take its box; score it (LE / OM / F1) and summarise masks
(area, entropy, total variation), following the reference CASM code (kondiz/casme). How a
mask covers the two copies or the parts of an object (synth --copies / --parts) is measured in
`coverage.py`, on the same binarisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

Box = list[int]

# The reference clamps the mean threshold into the open interval (0, 1), so an all-zero mask
# keeps nothing and an all-one mask keeps everything.
_THRESHOLD_EPS = 1e-6
# Same constants as the reference F1 (score.py: compute_f1).
_F1_EPS = 1e-6
# The reference's centre baseline: a 33 px border on a 224 px frame.
_CENTER_BORDER = 33 / 224


def _to_numpy(x: Any) -> np.ndarray:
    """A float32/float64 numpy array from an array or tensor (other dtypes become float32)."""
    if hasattr(x, "detach"):  # a torch.Tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) != "torch.float64":
            x = x.float()  # bf16 has no numpy dtype; fp16 would round 1 - 1e-6 up to 1
        x = x.numpy()
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float32)
    return x


def _as_batch(masks: Any) -> tuple[np.ndarray, bool]:
    """(B,H,W) float array from (B,H,W), (B,1,H,W) or (H,W); flag whether the input was 2-D."""
    arr = _to_numpy(masks)
    if arr.ndim == 2:
        return arr[None], True
    if arr.ndim == 4:
        if arr.shape[1] != 1:
            raise ValueError(f"expected one mask channel, got shape {arr.shape}")
        return arr[:, 0], False
    if arr.ndim == 3:
        return arr, False
    raise ValueError(f"expected masks of shape (H,W), (B,H,W) or (B,1,H,W), got {arr.shape}")


def binarize_at_mean(masks: Any) -> np.ndarray:
    """Binarise each mask at its own mean intensity (α = 1), as the reference does.

    The threshold is the k-th smallest value with k = 1 + int((n - 1) * (1 - mean) + 0.5),
    clamped to [1e-6, 1 - 1e-6]; pixels strictly above it are kept, so the kept fraction is
    about the mean.

    Args:
        masks: (B,H,W), (B,1,H,W) or (H,W) floats in [0, 1]; numpy or torch.

    Returns:
        Boolean array of the same shape without the channel dimension.
    """
    batch, single = _as_batch(masks)
    b, h, w = batch.shape
    n = h * w
    flat = batch.reshape(b, n)  # (B, H*W)
    means = flat.mean(axis=1, dtype=np.float64)  # (B,)
    # 0-based index of the reference's 1-based kthvalue; clip guards means slightly outside [0,1].
    kth = np.floor((n - 1) * (1.0 - means) + 0.5).astype(np.int64)
    kth = np.clip(kth, 0, n - 1)
    # One O(n) partition per row is faster than one batched O(n log n) sort.
    thresholds = np.array(
        [np.partition(row, k)[k] for row, k in zip(flat, kth, strict=True)], dtype=flat.dtype
    )  # (B,)
    lo, hi = flat.dtype.type(_THRESHOLD_EPS), flat.dtype.type(1 - _THRESHOLD_EPS)
    thresholds = np.clip(thresholds, lo, hi)
    binary = (flat > thresholds[:, None]).reshape(b, h, w)
    return binary[0] if single else binary


def largest_component(binary: Any) -> np.ndarray:
    """The largest 4-connected component of a binary mask (scipy.ndimage.label's default).

    Ties go to the component that comes first in raster order (the lowest label, as
    scipy.ndimage.label numbers them, which the reference takes through np.argmax).

    Args:
        binary: (H,W) boolean mask.

    Returns:
        (H,W) boolean mask of that component; all False when the input is.
    """
    import cv2

    binary = np.asarray(binary).astype(bool)
    if not binary.any():
        return np.zeros_like(binary)
    n_labels, labels, stats, _ = cv2.connectedComponentsWithStats(
        binary.astype(np.uint8), connectivity=4
    )
    areas = stats[1:, cv2.CC_STAT_AREA]  # label 0 is the background
    tied = np.flatnonzero(areas == areas.max()) + 1
    if len(tied) > 1:
        # cv2 normally numbers components in raster order too; make the tie-break explicit.
        flat_labels = labels.reshape(-1)
        first_pixel = [int(np.argmax(flat_labels == label)) for label in tied]
        best = tied[int(np.argmin(first_pixel))]
    else:
        best = tied[0]
    return labels == best


def mask_to_box(binary: Any) -> Box | None:
    """Tight box `[x0, y0, x1, y1]` (exclusive right/bottom) around the True pixels.

    Args:
        binary: (H,W) boolean mask.

    Returns:
        The box, or None when no pixel is set.
    """
    binary = np.asarray(binary).astype(bool)
    rows = binary.any(axis=1)  # (H,)
    cols = binary.any(axis=0)  # (W,)
    if not rows.any():
        return None
    y0 = int(np.argmax(rows))
    y1 = len(rows) - int(np.argmax(rows[::-1]))
    x0 = int(np.argmax(cols))
    x1 = len(cols) - int(np.argmax(cols[::-1]))
    return [x0, y0, x1, y1]


def masks_to_boxes(masks: Any) -> list[Box | None]:
    """Predicted box per continuous mask: binarise at the mean, largest component, tight box.

    The one pipeline every tool (eval, infer, export parity) uses.

    Args:
        masks: (B,H,W) or (B,1,H,W) floats in [0, 1] ((H,W) counts as a batch of one).

    Returns:
        One box or None (nothing above the threshold) per image.
    """
    batch, _ = _as_batch(masks)
    binaries = binarize_at_mean(batch)  # (B,H,W) bool
    return [mask_to_box(largest_component(b)) if b.any() else None for b in binaries]


def box_area(box: Sequence[float]) -> int | float:
    """Area of a box with exclusive edges; 0 when degenerate (integer boxes give an int)."""
    x0, y0, x1, y1 = box
    return max(0, x1 - x0) * max(0, y1 - y0)


def clip_box(box: Sequence[float], width: int, height: int) -> list:
    """Clip a box to the frame `[0, width] x [0, height]`."""
    x0, y0, x1, y1 = box
    return [
        min(max(x0, 0), width),
        min(max(y0, 0), height),
        min(max(x1, 0), width),
        min(max(y1, 0), height),
    ]


def box_iou(a: Sequence[float] | None, b: Sequence[float] | None) -> float:
    """Intersection over union of two boxes; 0 when either is None, empty or degenerate."""
    if a is None or b is None:
        return 0.0
    area_a, area_b = box_area(a), box_area(b)
    if area_a <= 0 or area_b <= 0:
        return 0.0
    inter = box_area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    return float(inter / (area_a + area_b - inter))


def localization_scores(
    mask: Any, pred_box: Sequence[float] | None, gt_boxes: Sequence[Sequence[float]]
) -> dict[str, Any]:
    """Score one image against its ground-truth boxes, with the reference's semantics.

    Per gt box (reference `get_loc_scores`): F1 of the continuous mask against the filled box,
    and IoU of the predicted rectangle with it. The gt area is the *unclipped* one (the
    reference does so), both as recall's denominator and in IoU's union; a box that clips to
    nothing scores F1 = 0 and no hit.

    Args:
        mask: (H,W) continuous mask in [0, 1] (a leading channel of 1 is accepted).
        pred_box: predicted box (exclusive edges), or None for an empty rectangle.
        gt_boxes: the image's boxes of its class, in the mask's frame; may extend outside.

    Returns:
        dict(hit=max IoU > 0.5, f1=max F1, f1a=mean F1, iou=max IoU) over the gt boxes.

    Raises:
        ValueError: when gt_boxes is empty.
    """
    if len(gt_boxes) == 0:
        raise ValueError("localization_scores needs at least one ground-truth box")
    m = _to_numpy(mask).astype(np.float64)
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2:
        raise ValueError(f"expected one (H,W) mask, got shape {m.shape}")
    height, width = m.shape
    mask_sum = float(m.sum())

    # The prediction as a filled rectangle; the reference's box never leaves the frame.
    pred = None if pred_box is None else [int(v) for v in clip_box(pred_box, width, height)]
    pred_area = 0 if pred is None else box_area(pred)

    f1s, ious = [], []
    for gt in gt_boxes:
        f1, iou = _gt_box_scores(m, mask_sum, pred, pred_area, gt)
        f1s.append(f1)
        ious.append(iou)

    best_iou = max(ious)
    return {
        "hit": bool(best_iou > 0.5),
        "f1": float(max(f1s)),
        "f1a": float(np.mean(f1s)),
        "iou": float(best_iou),
    }


def _gt_box_scores(
    m: np.ndarray, mask_sum: float, pred: Box | None, pred_area: int, gt: Sequence[float]
) -> tuple[float, float]:
    """`localization_scores` against one gt box: (F1 of the (H,W) float64 mask `m`, whose sum
    is `mask_sum`, and IoU of the clipped predicted box `pred` of area `pred_area`)."""
    height, width = m.shape
    x0, y0, x1, y1 = gt
    gt_size = (x1 - x0) * (y1 - y0)  # unclipped, as in the reference
    cx0, cy0, cx1, cy1 = (int(v) for v in clip_box(gt, width, height))
    if cx0 >= cx1 or cy0 >= cy1:
        return 0.0, 0.0
    inside = float(m[cy0:cy1, cx0:cx1].sum())
    precision = inside / (mask_sum + _F1_EPS)
    recall = inside / gt_size
    f1 = (2 * precision * recall) / (precision + recall + _F1_EPS)
    inter = (
        0
        if pred is None
        else box_area([max(pred[0], cx0), max(pred[1], cy0), min(pred[2], cx1), min(pred[3], cy1)])
    )
    return f1, float(inter / (pred_area + gt_size - inter))


def center_box(width: int, height: int) -> Box:
    """The reference's centre baseline box: a 33/224 border scaled to the frame."""
    bx = round(_CENTER_BORDER * width)
    by = round(_CENTER_BORDER * height)
    return [bx, by, width - bx, height - by]


def _entropies(batch: np.ndarray) -> np.ndarray:
    """Per-image −Σ m log2 m over 0 < m < 1, divided by the pixel count: (B,H,W) -> (B,)."""
    inner = (batch > 0) & (batch < 1)
    safe = np.where(inner, batch, 1.0)  # log2(1) = 0: excluded pixels add nothing
    terms = -safe * np.log2(safe)
    return terms.reshape(len(batch), -1).sum(axis=1) / (batch.shape[1] * batch.shape[2])


def _total_variations(batch: np.ndarray) -> np.ndarray:
    """Per-image mean squared horizontal + vertical difference: (B,H,W) -> (B,)."""
    dx = np.diff(batch, axis=2) ** 2  # (B,H,W-1)
    dy = np.diff(batch, axis=1) ** 2  # (B,H-1,W)
    tv_x = dx.reshape(len(batch), -1).mean(axis=1) if dx.size else np.zeros(len(batch))
    tv_y = dy.reshape(len(batch), -1).mean(axis=1) if dy.size else np.zeros(len(batch))
    return tv_x + tv_y


def single_mask(mask: Any) -> np.ndarray:
    """A (1,H,W) float64 array from one mask given as (H,W), (1,H,W) or (1,1,H,W)."""
    arr = _to_numpy(mask).astype(np.float64)
    if arr.ndim < 2 or math.prod(arr.shape[:-2]) != 1:
        raise ValueError(f"expected a single mask, got shape {arr.shape}")
    return arr.reshape(1, *arr.shape[-2:])


def mask_entropy(mask: Any) -> float:
    """Entropy of one mask: −Σ m log2 m over pixels with 0 < m < 1, over ALL pixels."""
    return float(_entropies(single_mask(mask))[0])


def total_variation(mask: Any) -> float:
    """Total variation of one mask: mean squared horizontal + mean squared vertical diff."""
    return float(_total_variations(single_mask(mask))[0])


class MaskStats:
    """Streaming mask statistics over batches (reference `stats.py: StatisticsContainer`).

    It keeps five running sums: images, per-image mean areas, their squares, entropies and
    total variations. `update` adds a batch of masks; `add_sums` adds sums computed elsewhere
    (the training loop sums on the GPU, `mask_stat_sums`, and reads them once per epoch).
    `mask_std` is the population std of per-image mean areas over all images seen (the
    reference averages per-batch sample stds instead, which depends on the batch size).
    """

    def __init__(self) -> None:
        self.sums = np.zeros(5, dtype=np.float64)  # n, sum a, sum a^2, sum entropy, sum tv

    @property
    def n_images(self) -> int:
        return int(self.sums[0])

    def update(self, masks: Any) -> None:
        """Add a batch of masks, (B,H,W) or (B,1,H,W)."""
        batch, _ = _as_batch(masks)
        batch = batch.astype(np.float64)
        areas = batch.reshape(len(batch), -1).mean(axis=1)  # (B,)
        self.add_sums(
            [
                len(batch),
                areas.sum(),
                (areas**2).sum(),
                _entropies(batch).sum(),
                _total_variations(batch).sum(),
            ]
        )

    def add_sums(self, sums: Sequence[float]) -> None:
        """Add `[n, sum a, sum a^2, sum entropy, sum tv]` of some masks (as `update` computes)."""
        self.sums += np.asarray(sums, dtype=np.float64)

    def result(self) -> dict[str, float | None]:
        """dict(mask_mean, mask_std, mask_entropy, mask_tv); values None before any update."""
        n, area, area_sq, entropy, tv = self.sums.tolist()
        if n == 0:
            return {"mask_mean": None, "mask_std": None, "mask_entropy": None, "mask_tv": None}
        mean = area / n
        return {
            "mask_mean": mean,
            "mask_std": math.sqrt(max(area_sq / n - mean**2, 0.0)),
            "mask_entropy": entropy / n,
            "mask_tv": tv / n,
        }


def mask_stat_sums(masks: Any) -> Any:
    """`MaskStats.add_sums`'s five sums of a (B, 1, H, W) torch batch, where the masks are.

    The same arithmetic as `MaskStats.update` (float64), in torch ops, so that the training
    loop keeps its mask statistics on the GPU and never copies a mask batch to the host.
    """
    import torch

    m = masks.detach()[:, 0].double()
    areas = m.mean(dim=(1, 2))
    inner = (m > 0) & (m < 1)
    safe = torch.where(inner, m, torch.ones_like(m))  # log2(1) = 0: the others add nothing
    entropies = (-safe * torch.log2(safe)).sum(dim=(1, 2)) / (m.shape[1] * m.shape[2])
    tv = torch.zeros_like(areas)
    if m.shape[2] > 1:
        tv = tv + (m[:, :, 1:] - m[:, :, :-1]).pow(2).mean(dim=(1, 2))
    if m.shape[1] > 1:
        tv = tv + (m[:, 1:] - m[:, :-1]).pow(2).mean(dim=(1, 2))
    count = torch.full((), len(m), dtype=torch.float64, device=m.device)  # a fill, not a copy
    return torch.stack([count, areas.sum(), areas.pow(2).sum(), entropies.sum(), tv.sum()])


class LocalizationMeter:
    """Streaming LE / OM / F1 / F1a over images (fractions in [0, 1]).

    OM counts only images whose classifier correctness is known (`correct` not None).
    """

    def __init__(self) -> None:
        self.n_images = 0
        self._misses = 0
        self._f1_sum = 0.0
        self._f1a_sum = 0.0
        self._om_images = 0
        self._om_errors = 0

    def update(self, hit: bool, f1: float, f1a: float, correct: bool | None = None) -> None:
        """Add one image's scores (from `localization_scores`) and its top-1 correctness."""
        self.n_images += 1
        self._misses += 0 if hit else 1
        self._f1_sum += float(f1)
        self._f1a_sum += float(f1a)
        if correct is not None:
            self._om_images += 1
            self._om_errors += 0 if (hit and correct) else 1

    def result(self) -> dict[str, float | int | None]:
        """dict(LE, OM, F1, F1a, n_images); OM is None when no image had a known class."""
        n = self.n_images
        if n == 0:
            return {"LE": None, "OM": None, "F1": None, "F1a": None, "n_images": 0}
        return {
            "LE": self._misses / n,
            "OM": self._om_errors / self._om_images if self._om_images else None,
            "F1": self._f1_sum / n,
            "F1a": self._f1a_sum / n,
            "n_images": n,
        }
