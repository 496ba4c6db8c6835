"""The pictures of `visualize`: the Fig. 2 grid, the masks with their boxes, boxes over an
image, heatmaps, PNG files.

Arrays in, arrays (or files) out: `visualize.run` gives them the images and masks of the
models, and puts the gallery's images in its HTML page. All pixels are uint8 RGB.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from casm_deploy.errors import UserError
from casm_deploy.evaluation.metrics import clip_box

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
DIM_FLOOR = 0.25  # masks.png: a pixel of mask 0 keeps this share of its brightness


def cell_size(image_size: int) -> int:
    """Side of one grid / gallery cell: the image upscaled by an integer factor to >= 128 px."""
    return image_size * math.ceil(MIN_CELL / image_size)


def grid_shape(num_images: int, num_models: int, image_size: int) -> tuple[int, int]:
    """(height, width) of `grid.png` in pixels."""
    step = cell_size(image_size) + PAD
    return HEADER_HEIGHT + num_models * len(ROW_NAMES) * step, LABEL_WIDTH + num_images * step


def masks_shape(num_images: int, num_methods: int, image_size: int) -> tuple[int, int]:
    """(height, width) of `masks.png`: the original row, then one row per method."""
    step = cell_size(image_size) + PAD
    return HEADER_HEIGHT + (1 + num_methods) * step, LABEL_WIDTH + num_images * step


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
    grid = _canvas(grid_shape(len(column_names), len(model_names), image_size), column_names, cell)
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


def draw_masks(
    images: np.ndarray,
    masks: list[np.ndarray],
    boxes: list[list[list[int] | None]],
    gt_boxes: list[list[list[int]]],
    method_names: list[str],
    column_names: list[str],
) -> np.ndarray:
    """`masks.png`: columns are images; the first row each photo with its ground-truth boxes
    (green), then one row per method: the photo dimmed where the method's mask is low, the
    true boxes and the method's predicted box (red), as `draw_boxes` draws them.

    Dimmed (`image * (DIM_FLOOR + (1 - DIM_FLOOR) * mask)`) rather than a JET heatmap blended
    over it: JET's own reds and greens would hide the red and green boxes, and the dimmed
    photo keeps its colours where the mask is high, so the object reads as the method sees it.

    Args:
        images: (N,S,S,3) uint8 RGB.
        masks: per method, (N,S,S) continuous masks in [0, 1].
        boxes: per method, its predicted box (or None) per image.
        gt_boxes: per image, its ground-truth boxes (none for a plain folder).
        method_names: one per method.
        column_names: one per image.

    Returns:
        (H,W,3) uint8 RGB, of `masks_shape(N, len(method_names), S)`.
    """
    size = images.shape[1]
    cell = cell_size(size)
    step, scale = cell + PAD, cell // size
    figure = _canvas(masks_shape(len(images), len(method_names), size), column_names, cell)
    if any(gt_boxes):  # the boxes' legend
        _put_text(figure, "true", 4, HEADER_HEIGHT - 7, 40, GT_COLOR)
    _put_text(figure, "predicted", 40, HEADER_HEIGHT - 7, LABEL_WIDTH - 44, PRED_COLOR)
    rows = [(ROW_NAMES[0], images, [None] * len(images))]
    for name, mask, predicted in zip(method_names, masks, boxes, strict=True):
        shown = images * (DIM_FLOOR + (1 - DIM_FLOOR) * np.clip(mask, 0, 1)[..., None])
        rows.append((name, np.round(shown).astype(np.uint8), predicted))
    for r, (name, shown, predicted) in enumerate(rows):
        top = HEADER_HEIGHT + r * step
        _put_text(figure, name, 4, top + cell // 2 + 4, LABEL_WIDTH - 8)
        for col, (image, pred, gts) in enumerate(zip(shown, predicted, gt_boxes, strict=True)):
            left = LABEL_WIDTH + col * step
            figure[top : top + cell, left : left + cell] = draw_boxes(image, pred, gts, scale)
    return figure


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


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N,3,S,S) float in [0, 1] -> (N,S,S,3) uint8."""
    pixels = images.clamp(0, 1).mul(255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def write_png(path: Path, image_rgb: np.ndarray, compression: int | None = None) -> None:
    """Write a PNG; `compression` 0-9 (9: smallest file, slowest), None: OpenCV's default."""
    import cv2

    params = [] if compression is None else [cv2.IMWRITE_PNG_COMPRESSION, compression]
    if not cv2.imwrite(str(path), cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), params):
        raise UserError(f"{path}: cannot write image")


def _canvas(shape: tuple[int, int], column_names: list[str], cell: int) -> np.ndarray:
    """A figure of (height, width) `shape` on the background, each column's name on top."""
    canvas = np.empty((*shape, 3), np.uint8)
    canvas[:] = BACKGROUND
    for col, name in enumerate(column_names):
        _put_text(canvas, name, LABEL_WIDTH + col * (cell + PAD) + 2, HEADER_HEIGHT - 7, cell - 4)
    return canvas


def _upscale(image: np.ndarray, side: int) -> np.ndarray:
    import cv2

    return cv2.resize(image, (side, side), interpolation=cv2.INTER_NEAREST)


def _put_text(
    canvas: np.ndarray, text: str, x: int, y: int, max_width: int, color: tuple = TEXT
) -> None:
    """Draw `text` with its baseline at (x, y), shortened with '..' to fit `max_width`."""
    import cv2

    font = cv2.FONT_HERSHEY_SIMPLEX
    text = text.encode("ascii", "replace").decode()  # Hershey fonts draw ASCII only
    shown = text
    while shown and cv2.getTextSize(shown, font, FONT_SCALE, 1)[0][0] > max_width:
        text = text[:-1]
        shown = text + ".."
    cv2.putText(canvas, shown, (x, y), font, FONT_SCALE, color, 1, cv2.LINE_AA)
