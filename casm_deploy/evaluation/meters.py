"""What `eval` measures, as meters: each is added one batch at a time and gives its results.

A meter is anything with `update(batch)` and `result() -> dict` (`Meter`): `batch` is one
method's masks of one batch with the truth they are scored against (`Batch`), and the result's
keys are what eval writes to JSON and prints as columns. The metrics themselves stay pure
functions in their own modules (`metrics` and `localisation`, `boxacc`, `pxap`, `coverage`);
each meter here wraps one family of them. `methods.choose_meters` picks a method's meters, and
its record is their results in that order (`results`).

A new metric is a module of its pure functions with a class of this shape, and one line in
`methods.choose_meters` (`faithfulness.Faithfulness`, which runs a judge classifier on the
images, is one such, in its own module).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from casm_deploy.evaluation import boxacc
from casm_deploy.evaluation.boxacc import BoxAccMeter
from casm_deploy.evaluation.coverage import copy_coverage, part_coverage
from casm_deploy.evaluation.localisation import score_localisation
from casm_deploy.evaluation.metrics import Box, LocalizationMeter, MaskStats
from casm_deploy.evaluation.pxap import PxAPMeter

COPY_KEYS = ("copy_share_lighter", "copy_touch_both")
PART_KEYS = ("part_coverage", "parts_all_touched", "part_share_least", "n_part_images")


@dataclass(frozen=True)
class Batch:
    """One batch of one method's masks, with what they are scored against.

    Every sequence has one entry per image, in the batch's order, in the model frame (S x S).
    """

    masks: torch.Tensor  # (B, 1, S, S) in [0, 1]
    boxes: Sequence[list[Box]]  # each image's ground-truth boxes of its own class
    labels: Sequence[int]  # each image's class as the method's classifier numbers it (-1: unknown)
    logits: torch.Tensor | None  # that classifier's (B, K) logits; None: no classifier, no OM
    object_masks: Sequence[Any] | None = None  # each image's object pixels, where data has them
    part_maps: Sequence[Any] | None = None  # each image's part label map (DATA/parts/)
    # for meters that run a classifier on the images (`faithfulness`): the images the masks are
    # of, (B, 3, S, S) in [0, 1], and each image's class as the data numbers it
    images: torch.Tensor | None = None
    data_labels: Sequence[int] | None = None

    @cached_property
    def arrays(self) -> np.ndarray:
        """The masks as one (B, S, S) float32 array, made once for all the meters."""
        return self.masks[:, 0].float().cpu().numpy()

    @cached_property
    def correct(self) -> list[bool | None]:
        """Each image's top-1 correctness, for OM; None where it is not known (a class the
        classifier does not know, or no classifier)."""
        if self.logits is None:
            return [None] * len(self.labels)
        predicted = self.logits.argmax(1).tolist()
        return [None if k < 0 else p == k for k, p in zip(self.labels, predicted, strict=True)]


@runtime_checkable
class Meter(Protocol):
    """Takes batches in one at a time; gives its results, under keys no other meter uses."""

    def update(self, batch: Batch) -> None: ...

    def result(self) -> dict[str, Any]: ...


def results(meters: Sequence[Meter]) -> dict[str, Any]:
    """The meters' results in one record, in the meters' order.

    Raises:
        ValueError: two meters give the same key.
    """
    record: dict[str, Any] = {}
    for meter in meters:
        result = meter.result()
        if set(result) & set(record):
            raise ValueError(f"{type(meter).__name__} repeats {sorted(set(result) & set(record))}")
        record.update(result)
    return record


class Localisation:
    """LE, OM, F1 and F1a (the paper's, `localisation.score_localisation`)."""

    def __init__(self) -> None:
        self.meter = LocalizationMeter()

    def update(self, batch: Batch) -> None:
        score_localisation(batch.arrays, batch.boxes, batch.correct, self.meter)

    def result(self) -> dict[str, Any]:
        return {k: v for k, v in self.meter.result().items() if k != "n_images"}


class MaskStatistics:
    """The masks' mean area, its std over images, entropy and total variation (`MaskStats`)."""

    def __init__(self) -> None:
        self.stats = MaskStats()

    def update(self, batch: Batch) -> None:
        self.stats.update(batch.masks)

    def result(self) -> dict[str, Any]:
        return self.stats.result()


class MaxBoxAcc:
    """MaxBoxAccV2 and MaxBoxAcc at each IoU threshold (`boxacc`, Choe et al.)."""

    def __init__(self) -> None:
        self.meter = BoxAccMeter()

    def update(self, batch: Batch) -> None:
        for mask, boxes in zip(batch.arrays, batch.boxes, strict=True):
            self.meter.add(mask, boxes)

    def result(self) -> dict[str, Any]:
        result = self.meter.result()
        return {k: result[k] for k in boxacc.KEYS}


class PxAP:
    """PxAP over the pixels of every image (`pxap`, Choe et al.): data with object masks."""

    def __init__(self) -> None:
        self.meter = PxAPMeter()

    def update(self, batch: Batch) -> None:
        if batch.object_masks is None:
            raise ValueError("PxAP needs each image's object mask")
        for mask, truth in zip(batch.arrays, batch.object_masks, strict=True):
            self.meter.add(mask, truth)

    def result(self) -> dict[str, Any]:
        return self.meter.result()


class Copies:
    """How the masks cover the two copies of two-copies images (`coverage.copy_coverage`), as
    means over images: the lighter copy's share of the mass, and how often both are touched."""

    def __init__(self) -> None:
        self.n = 0
        self.share_sum = 0.0
        self.touch_count = 0

    def update(self, batch: Batch) -> None:
        for mask, boxes in zip(batch.arrays, batch.boxes, strict=True):
            share, touches_both = copy_coverage(mask, boxes)
            self.n += 1
            self.share_sum += share
            self.touch_count += int(touches_both)

    def result(self) -> dict[str, Any]:
        n = self.n
        values = (self.share_sum / n, self.touch_count / n) if n else (None, None)
        return dict(zip(COPY_KEYS, values, strict=True))


class Parts:
    """How the masks cover the object's parts (`coverage.part_coverage`), as means over the
    images with at least one part in the frame, and how many those are."""

    def __init__(self) -> None:
        self.n = 0
        self.touched_sum = 0.0
        self.all_count = 0
        self.share_sum = 0.0

    def update(self, batch: Batch) -> None:
        if batch.part_maps is None:
            raise ValueError("part coverage needs each image's part label map")
        for mask, labels in zip(batch.arrays, batch.part_maps, strict=True):
            coverage = part_coverage(mask, labels)
            if coverage is None:  # the crop cut every part away: nothing to count
                continue
            self.n += 1
            self.touched_sum += coverage.touched
            self.all_count += int(coverage.all_touched)
            self.share_sum += coverage.share_least

    def result(self) -> dict[str, Any]:
        n = self.n
        sums = (self.touched_sum, self.all_count, self.share_sum)
        return dict(zip(PART_KEYS, [*(s / n if n else None for s in sums), n], strict=True))


class Images:
    """How many images were scored, and why OM leaves some out (OM needs the model's classes):
    `n_images`, after `OM_note` when it does. Eval's records end with it."""

    def __init__(self) -> None:
        self.n = 0
        self.unknown = 0  # images of classes the classifier does not know: no OM for them
        self.unpredicted = False  # no classifier at all (a masks-only export first): no OM

    def update(self, batch: Batch) -> None:
        self.n += len(batch.labels)
        self.unknown += sum(k < 0 for k in batch.labels)
        self.unpredicted |= batch.logits is None

    def om_note(self) -> str:
        """Why OM leaves images out ("" when it counts them all)."""
        n, unknown = self.n, self.unknown
        if self.unpredicted:
            return "OM is not defined: no classifier (a masks-only export predicts no class)"
        if not unknown:
            return ""
        if unknown == n:
            return f"OM is not defined for these {n} images: the model does not know their classes"
        return (
            f"OM counts only the {n - unknown} images of the model's classes: "
            f"it is not defined for the other {unknown}"
        )

    def result(self) -> dict[str, Any]:
        note = self.om_note()
        return {**({"OM_note": note} if note else {}), "n_images": self.n}
