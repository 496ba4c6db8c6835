"""`casm-deploy visualize`: look at what trained mappings do on a few validation images.

Writes a Fig. 2-style grid (original, masked-in, masked-out, inpainted masked-out per model), an
HTML gallery with predicted and ground-truth boxes, heatmaps and the scorer's IoU, and a JSON
record of both. Reads checkpoints (`load_masker`) and the data set (`data.py`); CPU only.

DATA may also be any folder of images (not an ImageNet layout: no classes.txt, train/ or val/):
then a seeded choice of its image files, whole as `infer` sees them, with the predicted boxes
and labels only (no ground truth, no IoU).
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from casm_deploy.checkpoint import NamedMasker, load_maskers
from casm_deploy.common.paths import check_folder
from casm_deploy.common.ui import console
from casm_deploy.config import VisualizeConfig, config_to_dict
from casm_deploy.data.datasets import (
    ImageDataset,
    check_policy,
    list_images,
    own_boxes,
    read_classes,
)
from casm_deploy.data.decode import NO_IMAGES, ImageError, quiet_decoders, read_image, scan
from casm_deploy.errors import UserError
from casm_deploy.evaluation import masking
from casm_deploy.evaluation.metrics import clip_box, localization_scores, masks_to_boxes

ROW_NAMES = ("original", "masked-in", "masked-out", "inpainted")
MIN_CELL = 128  # small images are upscaled (nearest, integer factor) to at least this
LABEL_WIDTH = 160  # the grid's left label column, pixels
HEADER_HEIGHT = 22  # the grid's top row of class names
PAD = 2  # gap after every cell, pixels
BACKGROUND = (32, 32, 32)
TEXT = (235, 235, 235)
PRED_COLOR = (255, 64, 64)  # RGB: predicted box
GT_COLOR = (64, 255, 64)  # RGB: ground-truth boxes
FONT_SCALE = 0.4


def cell_size(image_size: int) -> int:
    """Side of one grid / gallery cell: the image upscaled by an integer factor to >= 128 px."""
    return image_size * math.ceil(MIN_CELL / image_size)


def grid_shape(num_images: int, num_models: int, image_size: int) -> tuple[int, int]:
    """(height, width) of `grid.png` in pixels."""
    step = cell_size(image_size) + PAD
    return HEADER_HEIGHT + num_models * len(ROW_NAMES) * step, LABEL_WIDTH + num_images * step


def run(cfg: VisualizeConfig) -> dict[str, str]:
    """Draw the grid, the HTML gallery and the JSON record for `cfg.models` on `cfg.data`.

    Returns:
        {"grid": path, "html": path, "json": path}.

    Raises:
        UserError: no model, an unreadable checkpoint, models of different image sizes, an
            unknown resize policy, a data set / annotation problem, or a plain folder
            without a readable image file.
    """
    if not cfg.models:
        raise UserError("visualize needs at least one model checkpoint")
    check_policy(cfg.resize)
    check_folder(Path(cfg.out), "--out")
    models = load_maskers(cfg.models)
    size = models[0].spec["image_size"]

    plain = is_plain_folder(Path(cfg.data))
    if plain:  # no classes, no boxes: what the models see in someone's own photos
        annotations = ""
        pixels, records = folder_samples(Path(cfg.data), size, cfg.num_images, cfg.seed)
    else:
        info = read_classes(cfg.data)
        annotations = Path(cfg.annotations) if cfg.annotations else Path(cfg.data) / "annotations"
        samples = pick_samples(list_images(cfg.data, "val", info.wnids), cfg.num_images, cfg.seed)
        dataset = ImageDataset(samples, size, train=False, policy=cfg.resize)
        pixels = np.stack([dataset[i][0] for i in range(len(dataset))])  # (N,S,S,3) uint8 RGB
        records = [
            {
                "path": str(path),
                "class": info.wnids[label],
                "name": info.names[label],
                "boxes": own_boxes(path, info.wnids[label], annotations, size, cfg.resize),
                "models": [],
            }
            for path, label in samples
        ]
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255)  # (N,3,S,S)

    rows = []  # per model: the 4 grid rows, each (N,3,S,S)
    heatmaps = []  # per model: (N,S,S) continuous masks
    with torch.no_grad():
        for model in models:
            masks, logits = model.masker(images)
            binary = masking.binarize(masks)
            rows.append(
                [
                    images,
                    masking.masked_in(images, binary),
                    masking.masked_out(images, binary),
                    masking.inpaint(images, binary),
                ]
            )
            heatmaps.append(masks[:, 0])
            boxes = masks_to_boxes(masks)
            predicted = logits.argmax(dim=1).tolist()
            names = model.spec.get("names") or model.spec["wnids"]
            if plain:
                probabilities = logits.softmax(dim=1)
                for record, mask, box, k, p in zip(
                    records, masks, boxes, predicted, probabilities, strict=True
                ):
                    record["models"].append(
                        {
                            "model": model.name,
                            "checkpoint": model.path,
                            "box": box,
                            "predicted_class": model.spec["wnids"][k],
                            "predicted_name": names[k],
                            "score": round(float(p[k]), 6),
                            "mask_mean": float(mask.mean()),
                        }
                    )
                continue
            for record, mask, box, k in zip(records, masks, boxes, predicted, strict=True):
                scores = localization_scores(mask, box, record["boxes"])
                record["models"].append(
                    {
                        "model": model.name,
                        "checkpoint": model.path,
                        "box": box,
                        "iou": scores["iou"],
                        "hit": scores["hit"],
                        "predicted_class": model.spec["wnids"][k],
                        "predicted_name": names[k],
                        "correct": model.spec["wnids"][k] == record["class"],
                        "mask_mean": float(mask.mean()),
                    }
                )

    out = Path(cfg.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    grid = draw_grid(
        [_to_uint8(r) for model_rows in rows for r in model_rows],
        [m.name for m in models],
        [r["name"] or Path(r["path"]).name for r in records],  # a plain folder: file names
        size,
    )
    paths = {"grid": out / "grid.png", "html": out / "index.html", "json": out / "visualize.json"}
    _write_png(paths["grid"], grid)
    paths["html"].write_text(
        _gallery(out, pixels, [h.numpy() for h in heatmaps], records, models, size)
    )
    resolved = dataclasses.replace(cfg, annotations=str(annotations))
    if plain:
        console.print(
            f"{cfg.data}: not an ImageNet layout (no classes.txt, train/ or val/): "
            f"{len(records)} of its images, whole, with predicted boxes and labels only "
            "(no ground truth, no IoU)",
            markup=False,
            highlight=False,
        )
    paths["json"].write_text(
        json.dumps({"config": config_to_dict(resolved), "images": records}, indent=2) + "\n"
    )
    return {key: str(path) for key, path in paths.items()}


def is_plain_folder(data: Path) -> bool:
    """A folder of images rather than an ImageNet layout (classes.txt, train/ or val/)."""
    layout = ("classes.txt", "train", "val")
    return data.is_dir() and not any((data / name).exists() for name in layout)


def folder_samples(
    data: Path, size: int, count: int, seed: int
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """`count` image files under `data` (recursive), a seeded choice, read as `infer` reads
    them (the whole image at S x S); files that do not decode are passed over.

    Returns:
        (N,S,S,3) uint8 RGB pixels and their records (no class, no boxes), in path order.

    Raises:
        UserError: no image file under `data` decodes.
    """
    entries = [entry for entry in scan(data) if entry.error is None]
    picked = []
    with quiet_decoders():  # libpng's and libjpeg's own warnings stay off the console
        for i in np.random.default_rng(seed).permutation(len(entries)):
            try:
                picked.append((entries[i].path, read_image(entries[i].path, size)[0]))
            except ImageError:
                continue
            if len(picked) == count:
                break
    if not picked:
        found = f"{len(entries)} image files, none readable" if entries else NO_IMAGES
        raise UserError(f"{data}: {found}")
    picked.sort(key=lambda item: item[0])
    records = [
        {"path": str(path), "class": None, "name": None, "boxes": [], "models": []}
        for path, _ in picked
    ]
    return np.stack([pixels for _, pixels in picked]), records


def pick_samples(samples: list[tuple[Path, int]], count: int, seed: int) -> list[tuple[Path, int]]:
    """`count` samples spread over the classes: each class shuffled, then taken round-robin.

    Deterministic for a given seed; the class order is shuffled too, so a small `count` does
    not always show the first classes.
    """
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[tuple[Path, int]]] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    groups = [by_class[label] for label in sorted(by_class)]
    groups = [[group[i] for i in rng.permutation(len(group))] for group in groups]
    groups = [groups[i] for i in rng.permutation(len(groups))]
    picked = []
    for depth in range(max(len(g) for g in groups)):
        picked.extend(group[depth] for group in groups if depth < len(group))
    return picked[:count]


def draw_grid(
    rows: list[np.ndarray], model_names: list[str], column_names: list[str], image_size: int
) -> np.ndarray:
    """The Fig. 2 grid: columns are images, each model a block of the 4 `ROW_NAMES` rows.

    The original row is repeated in every block, so each block reads on its own. A top row
    names each column's true class; the left column names the model and the rows.

    Args:
        rows: len(model_names) * 4 arrays of (N,S,S,3) uint8 RGB, block after block.
        model_names: one per block.
        column_names: one per image.
        image_size: S.

    Returns:
        (H,W,3) uint8 RGB, of `grid_shape(N, len(model_names), S)`.
    """
    cell = cell_size(image_size)
    step = cell + PAD
    height, width = grid_shape(len(column_names), len(model_names), image_size)
    grid = np.empty((height, width, 3), np.uint8)
    grid[:] = BACKGROUND
    for col, name in enumerate(column_names):
        _put_text(grid, name, LABEL_WIDTH + col * step + 2, HEADER_HEIGHT - 7, cell - 4)
    for r, row in enumerate(rows):
        top = HEADER_HEIGHT + r * step
        model, kind = divmod(r, len(ROW_NAMES))
        if kind == 0:
            _put_text(grid, model_names[model], 4, top + 14, LABEL_WIDTH - 8)
            if model:  # a light line between model blocks
                grid[top - PAD : top] = (128, 128, 128)
        _put_text(grid, ROW_NAMES[kind], 12, top + cell // 2 + 4, LABEL_WIDTH - 16)
        for col, image in enumerate(row):
            left = LABEL_WIDTH + col * step
            grid[top : top + cell, left : left + cell] = _upscale(image, cell)
    return grid


def draw_boxes(
    image: np.ndarray, pred: list[int] | None, gts: list[list[int]], scale: int
) -> np.ndarray:
    """The image upscaled by `scale`, ground-truth boxes in green, the predicted box in red."""
    import cv2

    canvas = np.ascontiguousarray(_upscale(image, image.shape[0] * scale))
    h, w = image.shape[:2]
    for box, color in [(b, GT_COLOR) for b in gts] + [(pred, PRED_COLOR)]:
        if box is None:
            continue
        x0, y0, x1, y1 = clip_box(box, w, h)
        if x1 <= x0 or y1 <= y0:
            continue
        # Exclusive edges: the last pixel inside is x1 - 1.
        cv2.rectangle(canvas, (x0 * scale, y0 * scale), (x1 * scale - 1, y1 * scale - 1), color, 2)
    return canvas


def heatmap(mask: np.ndarray, scale: int) -> np.ndarray:
    """A continuous (H,W) mask in [0, 1] as an upscaled JET heatmap, (H*s,W*s,3) uint8 RGB."""
    import cv2

    values = np.clip(np.round(mask * 255), 0, 255).astype(np.uint8)
    colored = cv2.cvtColor(cv2.applyColorMap(values, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return _upscale(colored, mask.shape[0] * scale)


def _gallery(
    out: Path,
    pixels: np.ndarray,
    heatmaps: list[np.ndarray],
    records: list[dict[str, Any]],
    models: list[NamedMasker],
    image_size: int,
) -> str:
    """Write the gallery's images under `out/images/` and return the HTML page.

    Records without a class (a plain folder) show the predictions only.
    """
    scale = cell_size(image_size) // image_size
    esc = html.escape
    cards = []
    for i, (image, record) in enumerate(zip(pixels, records, strict=True)):
        if record["class"] is None:
            title = esc(Path(record["path"]).name)
        else:
            title = f"{esc(record['name'])} <small>({esc(record['class'])})</small>"
        parts = [f"<h2>{title}</h2>", f"<p class=path>{esc(record['path'])}</p>"]
        for j, (model, result) in enumerate(zip(models, record["models"], strict=True)):
            boxed, mask = f"images/{i:03d}-m{j}-boxes.png", f"images/{i:03d}-m{j}-mask.png"
            _write_png(out / boxed, draw_boxes(image, result["box"], record["boxes"], scale))
            _write_png(out / mask, heatmap(heatmaps[j][i], scale))
            images = f"<img src='{esc(boxed)}' alt='boxes'><img src='{esc(mask)}' alt='mask'>"
            if record["class"] is None:
                parts.append(
                    f"<div class=model>{images}<p><b>{esc(model.name)}</b><br>"
                    f"predicted: {esc(result['predicted_name'])} ({result['score']:.2f})<br>"
                    f"mask area {result['mask_mean']:.2f}</p></div>"
                )
                continue
            unseen = "" if record["class"] in model.spec["wnids"] else " (unseen class)"
            verdict = "hit" if result["hit"] else "miss"
            parts.append(
                f"<div class=model>{images}<p><b>{esc(model.name)}</b><br>"
                f"true: {esc(record['name'])}{esc(unseen)}<br>"
                f"predicted: {esc(result['predicted_name'])}"
                f"{' &#10003;' if result['correct'] else ''}<br>"
                f"IoU {result['iou']:.2f}: <span class={verdict}>{verdict}</span><br>"
                f"mask area {result['mask_mean']:.2f}</p></div>"
            )
        cards.append("<div class=card>" + "".join(parts) + "</div>")
    model_list = ", ".join(esc(f"{m.name} ({m.path})") for m in models)
    legend = f"""<span style="color:rgb{GT_COLOR}">green = ground truth</span>.
Heatmap: the continuous mask (blue 0, red 1). A hit is IoU &gt; 0.5 with the best ground-truth
box, as the scorer counts it."""
    if records and records[0]["class"] is None:
        legend = """Heatmap: the continuous mask (blue 0, red 1). A folder of images without
annotations: no ground truth, no IoU; predicted: the class and its probability."""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>casm-deploy visualize</title>
<style>
body {{ font-family: sans-serif; background: #f4f4f4; margin: 1em; }}
.card {{ display: inline-block; vertical-align: top; background: #fff; margin: 0.4em;
  padding: 0.5em; border-radius: 6px; box-shadow: 0 1px 3px #0003; }}
.card h2 {{ font-size: 1em; margin: 0.2em 0; }}
.path {{ font-size: 0.7em; color: #777; margin: 0; }}
.model {{ display: flex; gap: 0.4em; align-items: flex-start; margin-top: 0.5em; }}
.model img {{ image-rendering: pixelated; }}
.model p {{ font-size: 0.8em; margin: 0; }}
.hit {{ color: #080; font-weight: bold; }} .miss {{ color: #c00; font-weight: bold; }}
.legend span {{ padding: 0 0.4em; font-weight: bold; }}
</style></head><body>
<h1>casm-deploy visualize</h1>
<p>Models: {model_list}</p>
<p class=legend>Boxes: <span style="color:rgb{PRED_COLOR}">red = predicted</span>
(mask binarised at its mean, largest component, tight box)
{legend} Full grid: <a href="grid.png">grid.png</a>.</p>
{chr(10).join(cards)}
</body></html>
"""


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N,3,S,S) float in [0, 1] -> (N,S,S,3) uint8."""
    pixels = images.clamp(0, 1).mul(255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def _upscale(image: np.ndarray, side: int) -> np.ndarray:
    import cv2

    return cv2.resize(image, (side, side), interpolation=cv2.INTER_NEAREST)


def _put_text(canvas: np.ndarray, text: str, x: int, y: int, max_width: int) -> None:
    """Draw `text` with its baseline at (x, y), shortened with '..' to fit `max_width`."""
    import cv2

    font = cv2.FONT_HERSHEY_SIMPLEX
    text = text.encode("ascii", "replace").decode()  # Hershey fonts draw ASCII only
    shown = text
    while shown and cv2.getTextSize(shown, font, FONT_SCALE, 1)[0][0] > max_width:
        text = text[:-1]
        shown = text + ".."
    cv2.putText(canvas, shown, (x, y), font, FONT_SCALE, TEXT, 1, cv2.LINE_AA)


def _write_png(path: Path, image_rgb: np.ndarray) -> None:
    import cv2

    if not cv2.imwrite(str(path), cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)):
        raise UserError(f"{path}: cannot write image")


__all__ = ["cell_size", "draw_boxes", "draw_grid", "grid_shape", "heatmap", "pick_samples", "run"]
