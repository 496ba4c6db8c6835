"""`casm-deploy visualize`: look at what trained mappings do on a few validation images.

Writes a Fig. 2-style grid (original, masked-in, masked-out, inpainted masked-out per model), a
figure of each model's masks with its predicted and the ground-truth boxes (masks.png), an HTML
gallery with those boxes, heatmaps and the scorer's IoU, and a JSON record of them. Reads
checkpoints (`load_masker`) and the data set (`data/`); CPU only. With --gradcam-stage, Grad-CAM
of the first model's classifier is one more method after the models (`load_methods`). The
pictures themselves are drawn by `figures.py`.

DATA may also be any folder of images (not an ImageNet layout: no classes.txt, train/ or val/):
then a seeded choice of its image files, whole as `infer` sees them, with the predicted boxes
and labels only (no ground truth, no IoU).
"""

from __future__ import annotations

import dataclasses
import functools
import html
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from casm_deploy.common.files import make_folders
from casm_deploy.common.paths import check_folder
from casm_deploy.common.ui import console
from casm_deploy.config import VisualizeConfig, config_to_dict
from casm_deploy.data.decode import quiet_decoders, read_image
from casm_deploy.data.imagefiles import NO_IMAGES, ImageError, scan
from casm_deploy.data.imagenet import list_images, own_boxes, read_classes
from casm_deploy.data.torch_loader import ImageDataset
from casm_deploy.data.transforms import check_policy
from casm_deploy.errors import UserError
from casm_deploy.evaluation import masking
from casm_deploy.evaluation.exported import is_exported
from casm_deploy.evaluation.figures import (
    GT_COLOR,
    PRED_COLOR,
    cell_size,
    draw_boxes,
    draw_grid,
    draw_masks,
    heatmap,
    to_uint8,
    write_png,
)
from casm_deploy.evaluation.gradcam import gradcam
from casm_deploy.evaluation.methods import NamedMasker, load_maskers
from casm_deploy.evaluation.metrics import localization_scores, masks_to_boxes

# What run writes in OUT (visualize.json lists them under "files").
FILES = {"grid": "grid.png", "masks": "masks.png", "html": "index.html", "json": "visualize.json"}


def run(cfg: VisualizeConfig) -> dict[str, str]:
    """Draw the grid, the masks figure, the HTML gallery and the JSON record for `cfg.models`
    (and Grad-CAM, `cfg.gradcam_stage`) on `cfg.data`.

    Returns:
        {"grid": path, "masks": path, "html": path, "json": path}.

    Raises:
        UserError: no model, an unreadable checkpoint, models of different image sizes,
            Grad-CAM without a checkpoint first, an unknown resize policy, a data set /
            annotation problem, or a plain folder without a readable image file.
    """
    if not cfg.models:
        raise UserError("visualize needs at least one model checkpoint")
    check_policy(cfg.resize)
    check_folder(Path(cfg.out), "--out")
    models = load_methods(cfg)
    size = models[0].spec.image_size

    plain = is_plain_folder(Path(cfg.data))
    if plain:  # no classes, no boxes: what the models see in someone's own photos
        annotations = ""
        pixels, records = folder_samples(Path(cfg.data), size, cfg.num_images, cfg.seed)
    else:
        annotations = Path(cfg.annotations) if cfg.annotations else Path(cfg.data) / "annotations"
        pixels, records = dataset_samples(cfg, annotations, size)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255)  # (N,3,S,S)
    rows, heatmaps = apply_models(models, images, records, plain)
    out = Path(cfg.out)
    paths = {name: out / file for name, file in FILES.items()}
    make_folders(out / "images")
    _draw_figures(paths, pixels, rows, [h.numpy() for h in heatmaps], records, models)
    resolved = dataclasses.replace(cfg, annotations=str(annotations))
    if plain:
        console.print(
            f"{cfg.data}: not an ImageNet layout (no classes.txt, train/ or val/): "
            f"{len(records)} of its images, whole, with predicted boxes and labels only "
            "(no ground truth, no IoU)",
            markup=False,
            highlight=False,
        )
    record = {"config": config_to_dict(resolved), "files": FILES, "images": records}
    paths["json"].write_text(json.dumps(record, indent=2) + "\n")
    return {key: str(path) for key, path in paths.items()}


def load_methods(cfg: VisualizeConfig) -> list[NamedMasker]:
    """The models of `cfg.models`, then (`cfg.gradcam_stage`) Grad-CAM of the first one's
    classifier as one more model: called on images it gives (masks, logits) as a masker does,
    and its classes are that classifier's, so the grid, the boxes, the gallery and the record
    treat it as they treat the models.

    Raises:
        UserError: as `load_maskers`, or Grad-CAM is asked for and the first model is an
            exported file (checked before any file is read).
    """
    first = cfg.models[0]
    if cfg.gradcam_stage and is_exported(first):
        raise UserError(
            f"--gradcam-stage reads the gradients of the first model's classifier: give its "
            f"checkpoint first (runs/<name>/checkpoint.pt), not the exported {first} (an "
            "export, full or masks-only, has no gradients to read)"
        )
    models = load_maskers(cfg.models)
    if cfg.gradcam_stage:
        stage, classifier = cfg.gradcam_stage, models[0]
        explain = functools.partial(gradcam, classifier.masker, stage=stage)
        models.append(
            NamedMasker(f"Grad-CAM (stage {stage})", classifier.path, explain, classifier.spec)
        )
    return models


def _draw_figures(
    paths: dict[str, Path],
    pixels: np.ndarray,
    rows: list[list[torch.Tensor]],
    heatmaps: list[np.ndarray],
    records: list[dict[str, Any]],
    models: list[NamedMasker],
) -> None:
    """Write grid.png, masks.png and the HTML gallery (its images under `images/`): `rows` are
    the 4 grid rows of each model, `heatmaps` its (N,S,S) masks."""
    size = pixels.shape[1]
    names = [m.name for m in models]
    columns = [r["name"] or Path(r["path"]).name for r in records]  # a plain folder: file names
    grid = draw_grid([to_uint8(r) for model_rows in rows for r in model_rows], names, columns, size)
    write_png(paths["grid"], grid)
    boxes = [[r["models"][j]["box"] for r in records] for j in range(len(models))]
    gts = [r["boxes"] for r in records]
    figure = draw_masks(pixels, heatmaps, boxes, gts, names, columns)
    write_png(paths["masks"], figure, compression=9)  # meant for a README: the smallest file
    page = _gallery(paths["html"].parent, pixels, heatmaps, records, models, size)
    paths["html"].write_text(page)


def is_plain_folder(data: Path) -> bool:
    """A folder of images rather than an ImageNet layout (classes.txt, train/ or val/)."""
    layout = ("classes.txt", "train", "val")
    return data.is_dir() and not any((data / name).exists() for name in layout)


def dataset_samples(
    cfg: VisualizeConfig, annotations: Path, size: int
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """`cfg.num_images` validation images of an ImageNet layout (`pick_samples`), read as eval
    reads them (`cfg.resize` to S x S), with their classes and their boxes in that frame.

    Returns:
        (N,S,S,3) uint8 RGB pixels and their records (no model results yet).
    """
    info = read_classes(cfg.data)
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
    return pixels, records


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


@torch.no_grad()
def apply_models(
    models: list[NamedMasker], images: torch.Tensor, records: list[dict[str, Any]], plain: bool
) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """Run every model on `images`; add its results to each record (`add_results`).

    Returns:
        Per model: the 4 grid rows, each (N,3,S,S); and its (N,S,S) continuous masks.
    """
    rows, heatmaps = [], []
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
        add_results(records, model, masks, logits, plain)
    return rows, heatmaps


def add_results(
    records: list[dict[str, Any]],
    model: NamedMasker,
    masks: torch.Tensor,
    logits: torch.Tensor,
    plain: bool,
) -> None:
    """Append one model's result to each image's record: its box and predicted class, with
    the scorer's IoU and hit against the image's boxes, or (`plain`: no ground truth) the
    predicted class's probability."""
    boxes = masks_to_boxes(masks)
    predicted = logits.argmax(dim=1).tolist()
    chances = logits.softmax(dim=1)
    wnids = model.spec.wnids
    names = model.spec.names or wnids
    for record, mask, box, k, p in zip(records, masks, boxes, predicted, chances, strict=True):
        result = {"model": model.name, "checkpoint": model.path, "box": box}
        if plain:
            result.update(predicted_class=wnids[k], predicted_name=names[k])
            result.update(score=round(float(p[k]), 6))
        else:
            scores = localization_scores(mask, box, record["boxes"])
            result.update(iou=scores["iou"], hit=scores["hit"], predicted_class=wnids[k])
            result.update(predicted_name=names[k], correct=wnids[k] == record["class"])
        record["models"].append({**result, "mask_mean": float(mask.mean())})


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
    cards = [
        _card(out, i, image, record, models, heatmaps, scale)
        for i, (image, record) in enumerate(zip(pixels, records, strict=True))
    ]
    return _page(cards, models, plain=bool(records) and records[0]["class"] is None)


def _card(
    out: Path,
    i: int,
    image: np.ndarray,
    record: dict[str, Any],
    models: list[NamedMasker],
    heatmaps: list[np.ndarray],
    scale: int,
) -> str:
    """Image `i`'s card: its title, then per model its boxes and heatmap (written under
    `out/images/`) and what it predicted."""
    esc = html.escape
    if record["class"] is None:
        title = esc(Path(record["path"]).name)
    else:
        title = f"{esc(record['name'])} <small>({esc(record['class'])})</small>"
    parts = [f"<h2>{title}</h2>", f"<p class=path>{esc(record['path'])}</p>"]
    for j, (model, result) in enumerate(zip(models, record["models"], strict=True)):
        boxed, mask = f"images/{i:03d}-m{j}-boxes.png", f"images/{i:03d}-m{j}-mask.png"
        write_png(out / boxed, draw_boxes(image, result["box"], record["boxes"], scale))
        write_png(out / mask, heatmap(heatmaps[j][i], scale))
        images = f"<img src='{esc(boxed)}' alt='boxes'><img src='{esc(mask)}' alt='mask'>"
        parts.append(
            f"<div class=model>{images}<p><b>{esc(model.name)}</b><br>"
            f"{_prediction(record, model, result)}</p></div>"
        )
    return "<div class=card>" + "".join(parts) + "</div>"


def _prediction(record: dict[str, Any], model: NamedMasker, result: dict[str, Any]) -> str:
    """A model's lines on a card: the class it predicted, the box's verdict, the mask's area."""
    esc = html.escape
    if record["class"] is None:
        return (
            f"predicted: {esc(result['predicted_name'])} ({result['score']:.2f})<br>"
            f"mask area {result['mask_mean']:.2f}"
        )
    unseen = "" if record["class"] in model.spec.wnids else " (unseen class)"
    verdict = "hit" if result["hit"] else "miss"
    return (
        f"true: {esc(record['name'])}{esc(unseen)}<br>"
        f"predicted: {esc(result['predicted_name'])}"
        f"{' &#10003;' if result['correct'] else ''}<br>"
        f"IoU {result['iou']:.2f}: <span class={verdict}>{verdict}</span><br>"
        f"mask area {result['mask_mean']:.2f}"
    )


def _page(cards: list[str], models: list[NamedMasker], plain: bool) -> str:
    """The gallery's HTML page around its cards; `plain`: a folder without annotations."""
    model_list = ", ".join(html.escape(f"{m.name} ({m.path})") for m in models)
    legend = f"""<span style="color:rgb{GT_COLOR}">green = ground truth</span>.
Heatmap: the continuous mask (blue 0, red 1). A hit is IoU &gt; 0.5 with the best ground-truth
box, as the scorer counts it."""
    if plain:
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
{legend} Full grid: <a href="grid.png">grid.png</a>; masks and boxes:
<a href="masks.png">masks.png</a>.</p>
{chr(10).join(cards)}
</body></html>
"""


__all__ = ["pick_samples", "run"]
