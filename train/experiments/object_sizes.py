"""LE by object size: where the masks of section 8 fail.

    python train/experiments/object_sizes.py DATA OUT.json NAME=CHECKPOINT ...

Scores each checkpoint's masks, and the centre box, on DATA's validation images as `eval` does
(shorter side to the model's size, centre crop, mask binarised at its mean, largest component's
box), split by the true box's share of the frame; also the mean mask area and predicted box
area in each bin, and how the mask area follows the object's (correlation). OUT holds, per
name, {"bins": [{"lo", "hi", "n", "LE", "mask_area", "box_area"}...], "LE", "corr"}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from casm_deploy.checkpoint import load_masker
from casm_deploy.data.imagenet import list_images, own_boxes, read_classes
from casm_deploy.data.torch_loader import ImageDataset
from casm_deploy.evaluation.metrics import box_area, box_iou, center_box, masks_to_boxes

BINS = ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.01))  # the true box's share of the frame


def by_size(iou: np.ndarray, truth: np.ndarray, masks: np.ndarray, boxes: np.ndarray) -> dict:
    bins = []
    for lo, hi in BINS:
        sel = (truth >= lo) & (truth < hi)
        n = int(sel.sum())
        bins.append(
            {
                "lo": lo,
                "hi": hi,
                "n": n,  # an empty bin's figures are None
                "LE": float((iou[sel] <= 0.5).mean()) if n else None,
                "mask_area": float(masks[sel].mean()) if n else None,
                "box_area": float(boxes[sel].mean()) if n else None,
            }
        )
    corr = float(np.corrcoef(masks, truth)[0, 1]) if masks.std() > 0 else 0.0
    return {"LE": float((iou <= 0.5).mean()), "bins": bins, "corr": corr}


def main(data: str, out: str, named: list[str]) -> None:
    torch.set_num_threads(1)
    info = read_classes(data)
    samples = list_images(data, "val", info.wnids)
    results, truth = {}, None
    for item in named:
        name, path = item.split("=", 1)
        masker, spec = load_masker(path)
        size = spec.image_size
        dataset = ImageDataset(samples, size, train=False)
        if truth is None:  # every model here has the same input size
            annotations = Path(data) / "annotations"
            gt = [own_boxes(p, info.wnids[label], annotations, size)[0] for p, label in samples]
            truth = np.array([box_area(g) / size**2 for g in gt])
            centre = center_box(size, size)
            iou = np.array([box_iou(centre, g) for g in gt])
            full = np.full(len(gt), box_area(centre) / size**2)
            results["center"] = by_size(iou, truth, full, full)
        masker.eval()
        masks = []
        with torch.no_grad():
            for start in range(0, len(dataset), 128):
                batch = [dataset[k][0] for k in range(start, min(start + 128, len(dataset)))]
                images = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float() / 255
                masks.append(masker(images)[0])
        mask = torch.cat(masks)
        boxes = masks_to_boxes(mask)
        iou = np.array([box_iou(b, g) for b, g in zip(boxes, gt, strict=True)])
        areas = np.array([box_area(b) / size**2 if b else 0.0 for b in boxes])
        results[name] = by_size(iou, truth, mask.mean((1, 2, 3)).numpy(), areas)
    Path(out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
