"""Cost per image and localisation error of CASM, Grad-CAM and per-image mask optimisation.

Usage: python benchmarks/method_cost.py [--checkpoint runs/demo/checkpoint.pt] [--data data/synth]
       [--images 1000] [--maskopt-images 64] [--tune-images 32] [--steps 300] [--batch 64]
Prints tables and writes benchmarks/results/method_cost.json.

All three explain the same classifier, the demo checkpoint's encoder, in eager PyTorch on this
CPU: CASM is one forward of the Masker; Grad-CAM a forward and a backward
(casm_deploy.evaluation.gradcam, the stage among 2-4 with the best LE on the images); mask
optimisation is Fong & Vedaldi's (casm_deploy.evaluation.maskopt: `--steps` Adam steps per
image, the images of a batch optimised together).
Its fill and weights are picked from `--grid` on `--tune-images` validation images disjoint from
the ones it is scored on. Cost is milliseconds per image at batch `--batch` and at batch 1, and
FLOPs per image (torch's FlopCounterMode, backward passes included); the encoder's forward alone,
which every method pays, is timed as a reference. LE uses eval's pipeline: boxes from the
annotations in the model frame, masks binarised at their mean, largest component, IoU > 0.5.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from common import command, machine, write_json
from torch.utils.flop_counter import FlopCounterMode

from casm_deploy.checkpoint import load_masker
from casm_deploy.common.ui import console
from casm_deploy.data.imagenet import list_images, own_boxes
from casm_deploy.data.torch_loader import ImageDataset
from casm_deploy.evaluation.gradcam import gradcam
from casm_deploy.evaluation.maskopt import AREA, TV, optimize_masks, total_variation
from casm_deploy.evaluation.metrics import localization_scores, masks_to_boxes

GRADCAM_STAGES = (2, 3, 4)
# images (B, 3, S, S) in [0, 1] and labels (B,) -> masks (B, 1, S, S), logits (B, K)
Method = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def spread(indices: list[int], count: int) -> list[int]:
    """`count` of `indices` spread evenly (the list is sorted by class: every class is drawn)."""
    if count >= len(indices):
        return list(indices)
    return [indices[i] for i in np.linspace(0, len(indices) - 1, num=count).round().astype(int)]


def load(samples: list[tuple[Path, int]], size: int, wnids: list[str], annotations: Path):
    """Images as eval's loader gives them ((N, 3, S, S) in [0, 1], channels-last), labels and
    each image's ground-truth boxes in the model frame (centre crop)."""
    dataset = ImageDataset(samples, size, train=False)
    pixels = torch.from_numpy(np.stack([dataset[i][0] for i in range(len(dataset))]))
    images = pixels.permute(0, 3, 1, 2).float().div_(255)  # NHWC -> channels-last NCHW view
    labels = torch.tensor([label for _, label in samples])
    boxes = [own_boxes(path, wnids[label], annotations, size) for path, label in samples]
    return images, labels, boxes


def run_timed(method: Method, images: torch.Tensor, labels: torch.Tensor, batch: int) -> tuple:
    """The masks of all images, and the seconds spent inside `method` only."""
    masks, seconds = [], 0.0
    for start in range(0, len(images), batch):
        chunk, chunk_labels = images[start : start + batch], labels[start : start + batch]
        began = time.perf_counter()
        outputs = method(chunk, chunk_labels)
        seconds += time.perf_counter() - began
        masks.append(outputs[0].float())
    return torch.cat(masks), seconds


def best_seconds(
    method: Method, images: torch.Tensor, labels: torch.Tensor, batch: int, repeats: int
) -> float:
    """The best of `repeats` timed passes over `images`, after a warm-up call at this batch."""
    method(images[:batch], labels[:batch])
    return min(run_timed(method, images, labels, batch)[1] for _ in range(repeats))


def hits(masks: torch.Tensor, gt_boxes: list) -> np.ndarray:
    """Per image: does the mask's box hit a ground-truth box (IoU > 0.5)? As eval scores it."""
    masks_np = masks[:, 0].numpy()
    pairs = zip(masks_np, masks_to_boxes(masks_np), gt_boxes, strict=True)
    return np.array([localization_scores(m, box, gt)["hit"] for m, box, gt in pairs])


def localization_error(hit: np.ndarray) -> float:
    return round(1 - float(hit.mean()), 4)


def flops_per_image(method: Method, image: torch.Tensor, label: torch.Tensor) -> int:
    """FLOPs of `method` on one image, backward passes included (a multiply-add counts 2)."""
    with FlopCounterMode(display=False) as counter:
        method(image, label)
    return int(counter.get_total_flops())


def parse_grid(text: str) -> list[dict]:
    """`fill:area:tv,...` -> mask optimisation settings, in order (ties go to the first)."""
    grid = []
    for entry in text.split(","):
        fill, area, tv = entry.split(":")
        grid.append({"fill": fill, "area": float(area), "tv": float(tv)})
    return grid


# Fong & Vedaldi's own setting first, then blacked-out deletion (the project's masked-out image,
# what the demo classifier saw in training) with lighter area and TV weights.
DEFAULT_GRID = ",".join(
    [f"blur:{AREA:g}:{TV:g}"]
    + [f"black:{AREA / a:g}:{TV / t:g}" for a in (1, 4, 16) for t in (1, 10)]
)


class Explainers:
    """CASM, Grad-CAM and mask optimisation on one Masker, each as a `Method`."""

    def __init__(self, masker: torch.nn.Module, explain: str, steps: int):
        self.masker, self.explain, self.steps = masker, explain, steps

    def classes(self, labels: torch.Tensor) -> torch.Tensor | None:
        return labels if self.explain == "true" else None

    @torch.inference_mode()
    def casm(self, images: torch.Tensor, labels: torch.Tensor) -> tuple:
        return self.masker(images)  # one forward; CASM needs no class

    @torch.inference_mode()
    def encoder(self, images: torch.Tensor, labels: torch.Tensor) -> tuple:
        """Not a saliency method: the classifier's forward alone, which every method pays."""
        logits, _ = self.masker.encoder(self.masker.normalize(images))
        return logits, logits

    def gradcam(self, stage: int) -> Method:
        return lambda images, labels: gradcam(self.masker, images, stage, self.classes(labels))

    def maskopt(self, setting: dict) -> Method:
        def run(images: torch.Tensor, labels: torch.Tensor) -> tuple:
            classes = self.classes(labels)
            result = optimize_masks(self.masker, images, classes, steps=self.steps, **setting)
            return result.masks, result.logits

        return run


def tune_maskopt(
    explainers: Explainers,
    images: torch.Tensor,
    labels: torch.Tensor,
    boxes: list,
    grid: list[dict],
) -> tuple[dict, list[dict]]:
    """The mask optimisation setting of `grid` with the best LE on these (tuning) images, and
    each setting's figures."""
    tried = []
    for setting in grid:
        began = time.perf_counter()
        result = optimize_masks(
            explainers.masker,
            images,
            explainers.classes(labels),
            steps=explainers.steps,
            **setting,
        )
        spent = time.perf_counter() - began
        # The class's softmax score left on the deleted images: the objective less its penalties.
        penalties = setting["area"] * result.low_res.flatten(1).mean(1)
        penalties += setting["tv"] * total_variation(result.low_res, 3.0)
        tried.append(
            {
                **setting,
                "tune_LE": localization_error(hits(result.masks, boxes)),
                "score_after": round(float((result.objective - penalties).mean()), 4),
                "mask_mean": round(float(result.masks.mean()), 4),
            }
        )
        print(f"mask optimisation {tried[-1]} ({spent:.0f} s)")
    chosen = min(tried, key=lambda g: g["tune_LE"])  # the first of equals: the grid's order
    return {k: chosen[k] for k in ("fill", "area", "tv")}, tried


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/demo/checkpoint.pt")
    parser.add_argument("--data", default="data/synth", help="validation images and annotations")
    parser.add_argument("--images", type=int, default=1000, help="for CASM and Grad-CAM")
    parser.add_argument("--maskopt-images", type=int, default=64, help="a subset of --images")
    parser.add_argument("--tune-images", type=int, default=32, help="disjoint from the above")
    parser.add_argument("--steps", type=int, default=300, help="mask optimisation Adam steps")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="best of, fast methods")
    parser.add_argument("--latency-images", type=int, default=256, help="batch-1 timing, fast")
    parser.add_argument("--maskopt-latency-images", type=int, default=4, help="batch-1 timing")
    parser.add_argument("--explain", default="predicted", help="predicted or true class")
    parser.add_argument("--grid", default=DEFAULT_GRID, help="mask optimisation fill:area:tv,...")
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "method_cost.json")
    )
    args = parser.parse_args()
    if args.explain not in ("predicted", "true"):
        raise SystemExit(f"--explain {args.explain}: choose predicted or true")

    masker, spec = load_masker(args.checkpoint)
    masker = masker.to(memory_format=torch.channels_last)  # as the eager backend runs it
    explainers = Explainers(masker, args.explain, args.steps)
    size, wnids = spec.image_size, list(spec.wnids)
    data = Path(args.data)
    samples = list_images(data, "val", wnids)
    fast = spread(list(range(len(samples))), args.images)
    opt = spread(list(range(len(fast))), args.maskopt_images)  # positions within `fast`
    scored = {fast[k] for k in opt}
    tune = spread([i for i in range(len(samples)) if i not in scored], args.tune_images)
    images, labels, gt_boxes = load([samples[i] for i in fast], size, wnids, data / "annotations")
    tune_images, tune_labels, tune_boxes = load(
        [samples[i] for i in tune], size, wnids, data / "annotations"
    )
    opt_images, opt_labels, opt_boxes = images[opt], labels[opt], [gt_boxes[k] for k in opt]

    # CASM and Grad-CAM at stages 2-4 on all images, batch --batch.
    methods = {"casm": explainers.casm}
    methods |= {f"gradcam{s}": explainers.gradcam(s) for s in GRADCAM_STAGES}
    hit, seconds = {}, {}  # method -> per-image hits; best seconds at batch --batch
    for name, method in methods.items():
        hit[name] = hits(run_timed(method, images, labels, args.batch)[0], gt_boxes)
        seconds[name] = best_seconds(method, images, labels, args.batch, args.repeats)
        console.print(f"{name}: LE {localization_error(hit[name])} on {len(images)} images")
    best_stage = min(GRADCAM_STAGES, key=lambda s: localization_error(hit[f"gradcam{s}"]))
    best = f"gradcam{best_stage}"
    methods["encoder"] = explainers.encoder
    seconds["encoder"] = best_seconds(explainers.encoder, images, labels, args.batch, args.repeats)

    # Mask optimisation: fill and weights picked on the tuning images, scored on the others.
    setting, grid = tune_maskopt(
        explainers, tune_images, tune_labels, tune_boxes, parse_grid(args.grid)
    )
    methods["maskopt"] = explainers.maskopt(setting)
    masks, seconds["maskopt"] = run_timed(methods["maskopt"], opt_images, opt_labels, args.batch)
    hit["maskopt"] = hits(masks, opt_boxes)

    # Batch 1, and FLOPs per image: the encoder, CASM, the best Grad-CAM, mask optimisation.
    count, slow = args.latency_images, args.maskopt_latency_images
    latency = {
        name: best_seconds(methods[name], images[:count], labels[:count], 1, args.repeats) / count
        for name in ("encoder", "casm", best)
    }
    # (one pass: a 300-step optimisation is its own warm-up)
    latency["maskopt"] = run_timed(methods["maskopt"], opt_images[:slow], opt_labels, 1)[1] / slow
    flops = {name: flops_per_image(methods[name], images[:1], labels[:1]) for name in latency}

    rows = []
    for name in ("encoder", *hit):
        timed = len(opt_images) if name == "maskopt" else len(images)
        method_hits = hit.get(name)
        row = {
            "method": name,
            "images": timed,
            "ms_per_image_batch": round(1000 * seconds[name] / timed, 4),
            "LE_all": None if name in ("encoder", "maskopt") else localization_error(method_hits),
            "LE_maskopt_images": None
            if name == "encoder"
            else localization_error(method_hits if name == "maskopt" else method_hits[opt]),
        }
        if name in latency:
            row["ms_per_image_batch1"] = round(1000 * latency[name], 4)
            row["flops_per_image"] = flops[name]
        rows.append(row)
    by = {row["method"]: row for row in rows}

    def ratio(key: str, slow: str) -> float:
        return round(by[slow][key] / by["casm"][key], 2)

    targets = {
        "gradcam_stage": best_stage,
        "gradcam_over_casm_cost_at_least_3x": {
            f"batch {args.batch}": ratio("ms_per_image_batch", best),
            "batch 1": ratio("ms_per_image_batch1", best),
            "flops": ratio("flops_per_image", best),
        },
        "maskopt_over_casm_cost_at_least_100x": {
            f"batch {args.batch}": ratio("ms_per_image_batch", "maskopt"),
            "batch 1": ratio("ms_per_image_batch1", "maskopt"),
            "flops": ratio("flops_per_image", "maskopt"),
        },
        "LE_on_maskopt_images": {k: by[k]["LE_maskopt_images"] for k in ("casm", best, "maskopt")},
        "LE_on_all_images": {k: by[k]["LE_all"] for k in ("casm", best)},
    }
    eval_json = Path(args.checkpoint).parent / "eval.json"
    reference = json.loads(eval_json.read_text()).get("LE") if eval_json.is_file() else None

    print(f"\nper image on {os.cpu_count()} CPU cores ({torch.get_num_threads()} torch threads)")
    print(
        f"{'method':<10}{'images':>7}{'ms, batch ' + str(args.batch):>15}{'ms, batch 1':>13}"
        f"{'MFLOP':>10}{'LE all':>8}{'LE on ' + str(len(opt_images)):>9}"
    )

    def cell(value: float | None, scale: float = 1, digits: int = 3) -> str:
        return "-" if value is None else f"{value * scale:.{digits}f}"

    for row in rows:
        print(
            f"{row['method']:<10}{row['images']:>7}{cell(row['ms_per_image_batch']):>15}"
            f"{cell(row.get('ms_per_image_batch1')):>13}"
            f"{cell(row.get('flops_per_image'), 1e-6, 0):>10}"
            f"{cell(row['LE_all']):>8}{cell(row['LE_maskopt_images']):>9}"
        )
    print(f"\nmask optimisation chosen on {len(tune_images)} tuning images: {setting}")
    print("targets:", json.dumps(targets))
    if reference is not None:
        print(f"CASM LE in {eval_json} (casm-deploy eval, full val): {reference}")

    result = {
        "command": command("method_cost.py", args),
        "machine": machine(),
        "rows": rows,
        "maskopt": {
            "chosen": setting,
            "steps": args.steps,
            "tuning_images": len(tune_images),
            "batch_1_images": min(args.maskopt_latency_images, len(opt_images)),
            "grid": grid,
        },
        "targets": targets,
        "eval_json_casm_LE": reference,
    }
    write_json(args.out, result)


if __name__ == "__main__":
    main()
