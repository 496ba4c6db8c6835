"""infer's output files: each image's mask (and overlay) under OUT, summary.json, COCO file.

pipeline.collect -> Writer.write (a PNG or npy mask, an overlay JPEG; paths kept inside OUT,
names shortened to fit) -> outfolder.write_atomic; at the end of a run write_summary and
write_coco read the whole record, boxes.jsonl. A masks-only model's rows have no label fields:
its overlays carry no class name and its COCO file one category, "salient object".
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np

from casm_deploy.common.files import PARTIAL, make_folders
from casm_deploy.data.decode import read_overlay
from casm_deploy.data.imagefiles import MAX_PIXELS, Entry, ImageError
from casm_deploy.deploy.infer.outfolder import (
    RECORD,
    SUMMARY,
    OutputError,
    as_user_error,
    name_limits,
    rows,
    write_atomic,
    write_own,
)
from casm_deploy.deploy.runtime.info import ModelInfo
from casm_deploy.deploy.runtime.masker import float_masks, resize_mask
from casm_deploy.version import __version__

OVERLAY_SIDE = 512  # longest side of an overlay image


class Writer:
    """Writes one file's mask (and overlay) under OUT, and never anywhere else.

    `masks`: png (8-bit), npy (float32) or none; `mask_size`: original (each image's size) or
    model (the model's input size); `overlay`: also the image dimmed by its mask, read again
    under `max_pixels` (infer's --masks, --mask-size, --overlay and --max-megapixels).
    """

    def __init__(
        self,
        out: Path,
        masks: Literal["png", "npy", "none"] = "png",
        mask_size: Literal["original", "model"] = "original",
        overlay: bool = False,
        max_pixels: int = MAX_PIXELS,
    ):
        self.out = out
        self.real_out = out.resolve()
        self.masks, self.mask_size = masks, mask_size
        self.overlay, self.max_pixels = overlay, max_pixels
        self.checked: set[Path] = set()  # folders already made and found inside OUT
        self.name_max, self.path_max = name_limits(out)

    def target(self, folder: str, rel: str, suffix: str) -> Path:
        """OUT/folder/rel+suffix, after checking that it stays inside OUT.

        A file name too long for the file system becomes a readable prefix, "~", 16 hex
        digits of the SHA-256 of `rel` (unique) and the suffix; a path too long for it goes to
        OUT/folder/~long/ under such a name. The record then names the file written.

        Raises:
            OutputError: the path would leave OUT (`..`, an absolute path, or a symbolic link
                on the way that points outside), or a file stands where a folder must be.
            OSError: the file system refused a folder (a full disk, a path too long).
        """
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts:
            raise OutputError(f"output path {rel!r} would leave the output folder")
        path = self.out / folder / (rel + suffix)
        if len(os.fsencode(path.name)) > self.name_max:
            path = path.with_name(self.short_name(rel, suffix))
        if len(os.fsencode(path)) + len(PARTIAL) + 1 >= self.path_max:  # and its temporary
            path = self.out / folder / "~long" / self.short_name(rel, suffix)
        if path.parent in self.checked:
            return path
        existing = path.parent
        while not existing.exists():
            existing = existing.parent
        if not existing.resolve().is_relative_to(self.real_out):
            raise OutputError(f"output folder {existing} leads outside {self.out} (a link)")
        try:
            make_folders(path.parent)  # any depth: a file 1,000 folders deep is just a file
        except NotADirectoryError as error:
            where = Path(error.filename).relative_to(self.out).as_posix()
            raise OutputError(f"cannot make its output folder: {where} is not a folder") from None
        if path.parent.resolve().is_relative_to(self.real_out):
            self.checked.add(path.parent)
        return path

    def short_name(self, rel: str, suffix: str) -> str:
        tail = f"~{hashlib.sha256(os.fsencode(rel)).hexdigest()[:16]}{suffix}"
        prefix = os.fsencode(Path(rel).name)[: self.name_max - len(tail)]
        return prefix.decode("utf-8", "ignore") + tail  # a character cut in two is dropped

    def write(self, entry: Entry, mask: np.ndarray, row: dict[str, Any]) -> None:
        """Write one (S, S) mask: floats in [0, 1], or uint8 levels (from the GPU).

        PNG masks are made 8-bit at S x S and resized as levels for `--mask-size original`
        (a float mask of a 13,000 px image would take 676 MB; a level may differ by one from
        resizing the floats first); npy keeps floats. A shortened name is recorded in the row
        ("mask", "overlay": the path written, relative to OUT).
        """
        width, height = row["width"], row["height"]
        original = self.mask_size == "original"
        if self.masks == "png":
            import cv2

            levels = mask if mask.dtype == np.uint8 else np.rint(mask * 255).astype(np.uint8)
            full = resize_mask(levels, width, height) if original else levels
            ok, png = cv2.imencode(".png", full)
            if not ok:
                raise OutputError("cannot encode the mask as PNG")
            self.put("masks", entry.rel, ".png", png.tobytes(), row, "mask")
        elif self.masks == "npy":
            floats = float_masks(mask).astype(np.float32)
            full = resize_mask(floats, width, height) if original else floats
            buffer = io.BytesIO()
            np.save(buffer, full)
            self.put("masks", entry.rel, ".npy", buffer.getvalue(), row, "mask")
        if self.overlay:
            # a masks-only model names no class: the box alone
            label = overlay_label(row["name"], row["score"]) if "name" in row else ""
            args = (entry.path, float_masks(mask), row["box"], width, height, self.max_pixels)
            jpeg = overlay(*args, label=label)
            self.put("overlays", entry.rel, ".jpg", jpeg, row, "overlay")

    def put(self, folder: str, rel: str, suffix: str, data: bytes, row: dict, key: str) -> None:
        path = self.target(folder, rel, suffix)
        write_atomic(path, data)
        if path != self.out / folder / (rel + suffix):
            row[key] = path.relative_to(self.out).as_posix()


def overlay(
    path: Path,
    mask: np.ndarray,
    box: list[int] | None,
    width: int,
    height: int,
    limit: int = MAX_PIXELS,
    label: str = "",
) -> bytes:
    """The image (longest side at most OVERLAY_SIDE) dimmed where the mask is low, with its box
    and `label` (`overlay_label`; at the top left without a box)."""
    import cv2

    try:
        # a large JPEG is decoded at a reduced scale
        image = read_overlay(path, OVERLAY_SIDE, max_pixels=limit)
    except ImageError as error:  # the file changed since it was read for the model
        raise OutputError(f"cannot make the overlay: {error}") from None
    h, w = image.shape[:2]
    weight = resize_mask(mask, w, h)[:, :, None]
    shown = (image * (0.3 + 0.7 * weight)).astype(np.uint8)  # salient pixels stay bright
    thickness = max(1, round(max(h, w) / 200))  # 1 px up to 300 px, 3 px at 512
    corner = (0, 0)
    if box is not None:
        scale = min(1.0, OVERLAY_SIDE / max(width, height))
        x0, y0, x1, y1 = (round(v * scale) for v in box)
        cv2.rectangle(shown, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), BOX_COLOR, thickness)
        corner = (x0, y0)
    if label:
        draw_label(shown, label, corner, thickness)
    ok, jpeg = cv2.imencode(".jpg", shown, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise OutputError("cannot encode the overlay")
    return jpeg.tobytes()


BOX_COLOR = (0, 255, 0)  # BGR: green, and the label's background


def overlay_label(name: str, score: float) -> str:
    """An overlay's label: the predicted class name and its probability."""
    return f"{name} {score:.2f}"


def draw_label(image: np.ndarray, text: str, corner: tuple[int, int], thickness: int) -> None:
    """`text`, black on a filled box of BOX_COLOR, sitting on `corner` (a box's top left): above
    it where there is room, else just below; shifted and shortened ("..") to stay inside."""
    import cv2

    h, w = image.shape[:2]
    font, scale, weight = cv2.FONT_HERSHEY_SIMPLEX, max(0.3, max(h, w) / 640), max(1, thickness - 1)
    pad = thickness + 1
    text = text.encode("ascii", "replace").decode()  # Hershey fonts draw ASCII only
    shown = text
    while (size := cv2.getTextSize(shown, font, scale, weight))[0][0] + 2 * pad > w and text:
        text = text[:-1]
        shown = text + ".."
    (text_width, text_height), baseline = size
    box_width, box_height = text_width + 2 * pad, text_height + baseline + 2 * pad
    x, y = corner
    y = y - box_height if y >= box_height else y  # a box at the top edge: its label inside
    x, y = max(0, min(x, w - box_width)), max(0, min(y, h - box_height))
    cv2.rectangle(image, (x, y), (x + box_width - 1, y + box_height - 1), BOX_COLOR, cv2.FILLED)
    origin = (x + pad, y + pad + text_height)
    cv2.putText(image, shown, origin, font, scale, (0, 0, 0), weight, cv2.LINE_AA)


# --- the results ------------------------------------------------------------------------------


def run_summary(
    info: ModelInfo, config: dict[str, Any], counts: dict[str, int], seconds: float
) -> dict[str, Any]:
    """One run's part of summary.json: its counts and speed, the model and where it ran, and
    `config` (the command's, `config.config_to_dict`)."""
    done = counts["ok"] + counts["error"]
    return {
        "this_run": {**counts, "seconds": round(seconds, 3)},
        "images_per_second": round(done / seconds, 2) if done and seconds > 0 else None,
        "backend": info.backend,
        "provider": info.provider,
        "device": info.device,
        "precision": info.precision,
        "masks_only": info.masks_only,  # no classifier: the rows have no label fields
        "model": info.path,
        "model_sha256": info.sha256,
        "image_size": info.image_size,
        "package_version": __version__,
        "config": config,
    }


def write_summary(out: Path, run: dict[str, Any]) -> dict[str, Any]:
    """OUT/summary.json: counts over the whole record (every run into OUT), then `run`
    (`run_summary`: this run, or a merged sharded job with its `shards`)."""
    totals = {"ok": 0, "error": 0}
    for row in rows(out / RECORD):
        totals[row["status"]] += 1
    summary = {**totals, "files": totals["ok"] + totals["error"], **run}
    write_own(out / SUMMARY, (json.dumps(summary, indent=2) + "\n").encode())
    return summary


SALIENT = {"id": 1, "name": "salient object", "supercategory": "saliency"}
MASKS_ONLY_NOTE = (
    "a masks-only model (no classifier): every box is the one category 'salient object', and "
    "no box has a score (the model gives none)"
)


def write_coco(record: Path, path: Path, info: ModelInfo) -> None:
    """COCO-style detections: `images`, `categories` (ids = class index + 1) and one
    `annotations` entry with a `score` per image with a box (the results list of COCO's API).

    A masks-only model predicts no class and no confidence: its boxes are of one category,
    SALIENT, with no `score`, and `info.description` says so.
    """
    masks_only = info.masks_only
    images, annotations = [], []
    for image_id, row in enumerate(rows(record), start=1):
        if row["status"] != "ok":
            continue
        images.append(
            {
                "id": image_id,
                "file_name": row["path"],
                "width": row["width"],
                "height": row["height"],
            }
        )
        if row["box"] is not None:
            x0, y0, x1, y1 = row["box"]
            annotation = {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": SALIENT["id"] if masks_only else row["class_index"] + 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": (x1 - x0) * (y1 - y0),
                "iscrowd": 0,
            }
            if not masks_only:
                annotation["score"] = row["score"]
            annotations.append(annotation)
    coco: dict[str, Any] = {"images": images, "annotations": annotations}
    if masks_only:
        coco = {"info": {"description": MASKS_ONLY_NOTE}, **coco, "categories": [SALIENT]}
    else:
        coco["categories"] = [
            {"id": k + 1, "name": info.label(k)[1], "supercategory": info.label(k)[0]}
            for k in range(info.num_classes)
        ]
    try:
        make_folders(path.parent)
    except OSError as error:
        raise as_user_error(error, path) from None
    write_own(path, (json.dumps(coco) + "\n").encode())
