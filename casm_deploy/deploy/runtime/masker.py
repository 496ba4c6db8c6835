"""`casm_deploy.Masker`: a trained mapping loaded for use, with masks, boxes and labels back.

    masker = casm_deploy.Masker.load("export/default/masker.onnx")
    result = masker.predict(["cat.jpg", "dog.png"])   # or HWC uint8 arrays, or tensors
    result.boxes[0], result.labels[0], result.masks[0].shape   # (H, W) of cat.jpg

It is the inference-side twin of `casm_deploy.models.mapping.SaliencyModel` (the nn.Module that is
trained and exported); `infer` runs the same `run` and `describe` over whole folders. A
masks-only export (`export --masks-only`: no classifier) gives masks and boxes, and None for
every label field (`masker.masks_only` says so).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from casm_deploy.data.decode import read_image, resize_square
from casm_deploy.data.imagefiles import ImageError
from casm_deploy.deploy.runtime.device_io import Outputs, Pending
from casm_deploy.deploy.runtime.info import ModelInfo
from casm_deploy.deploy.runtime.open import DEFAULT_BATCH, Backend, open_model
from casm_deploy.evaluation.metrics import Box, masks_to_boxes


@dataclass
class Prediction:
    """Per image: its mask (float32 in [0, 1], at the original size unless asked otherwise),
    its box `[x0, y0, x1, y1]` in original pixels (exclusive edges; None for an empty mask),
    the predicted class (id, name, index) and its softmax score. A masks-only model predicts no
    class: its labels, names, indices and scores are None, one per image."""

    masks: list[np.ndarray] = field(default_factory=list)
    boxes: list[Box | None] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    names: list[str | None] = field(default_factory=list)
    indices: list[int | None] = field(default_factory=list)
    scores: list[float | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.boxes)


def scale_box(box: Box | None, size: int, width: int, height: int) -> Box | None:
    """A box of the `size` x `size` model frame in the pixels of a `width` x `height` image.

    Edges move outwards (floor / ceil), so the box still covers every pixel the mask covers.
    """
    if box is None:
        return None
    x0, y0, x1, y1 = box
    sx, sy = width / size, height / size
    return [
        math.floor(x0 * sx),
        math.floor(y0 * sy),
        min(width, math.ceil(x1 * sx)),
        min(height, math.ceil(y1 * sy)),
    ]


def float_masks(masks: np.ndarray) -> np.ndarray:
    """Masks as floats in [0, 1]: uint8 masks (from the GPU, 8-bit levels) divided by 255."""
    if masks.dtype == np.uint8:
        return masks.astype(np.float32) / 255
    return masks


def resize_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """A (S, S) mask, float or uint8, at `width` x `height` (bilinear, as the decoder
    upsamples)."""
    import cv2

    if mask.shape == (height, width):
        return mask
    return cv2.resize(mask, (width, height), interpolation=cv2.INTER_LINEAR)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def to_uint8_image(item: Any, size: int) -> tuple[np.ndarray, int, int]:
    """One input of `predict` as the model's (S, S, 3) uint8 RGB image and its width and height.

    Accepts a path; an (H, W, 3) or (H, W) array, uint8 or float in [0, 1]; a (3, H, W) tensor
    (the Masker's layout) in [0, 1] or uint8.
    """
    if isinstance(item, (str, Path)):
        try:
            return read_image(item, size)
        except ImageError as error:
            raise ValueError(f"{item}: {error}") from None
    if hasattr(item, "detach"):  # a torch tensor: (3, H, W) -> (H, W, 3)
        item = item.detach().cpu().numpy()
        if item.ndim == 3 and item.shape[0] in (1, 3):
            item = item.transpose(1, 2, 0)
    image = np.asarray(item)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    if image.dtype != np.uint8:
        image = (np.clip(image.astype(np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    height, width = image.shape[:2]
    return resize_square(image, size), width, height


def _items(inputs: Any) -> list[Any]:
    """A batch given as one path, one image, a list of either, or a (B, ...) array / tensor."""
    if isinstance(inputs, (str, Path)):
        return [inputs]
    if isinstance(inputs, Sequence):
        return list(inputs)
    shape = tuple(inputs.shape)
    if len(shape) == 4:  # (B, H, W, 3) array or (B, 3, H, W) tensor
        return list(inputs)
    return [inputs]


class Masker:
    """A mask extractor loaded from an ONNX, TorchScript or checkpoint file."""

    def __init__(self, backend: Backend, batch_size: int = DEFAULT_BATCH):
        self.backend = backend
        self.batch_size = batch_size

    @classmethod
    def load(
        cls,
        path: str | Path,
        backend: str = "auto",
        device: str = "auto",
        batch_size: int = DEFAULT_BATCH,
        expect_sha256: str = "",
    ) -> Masker:
        """Open `path` (.onnx, .ts or a training checkpoint) on `device` (auto: CUDA if any),
        for batches of up to `batch_size` images (`predict`'s default; TensorRT's range).

        A TorchScript file is a program (loading and calling it runs its code; it is inspected
        first, a safeguard, not a sandbox); an ONNX file is data: prefer ONNX for files you did
        not make. `expect_sha256` pins the file: a file of another SHA-256 is refused before
        anything in it is read, as is one that differs from the export.json beside it.

        A model trained on `casm-deploy data synth`'s shapes (the demo model) prints a note
        saying its masks and labels mean nothing on photos (`info.training_data` is then
        "synthetic"; the note is in `backend.notices`). A checkpoint whose mask decoder was
        never trained (a `--classifier-only` run) is refused.

        Raises:
            UserError: see `open_model`.
        """
        return cls(open_model(path, backend, device, batch_size, expect_sha256), batch_size)

    @property
    def info(self) -> ModelInfo:
        return self.backend.info

    @property
    def image_size(self) -> int:
        return self.info.image_size

    @property
    def masks_only(self) -> bool:
        """The model has no classifier (`export --masks-only`): masks and boxes, no labels."""
        return self.info.masks_only

    def run(self, images: np.ndarray) -> Outputs:
        """(B, S, S, 3) uint8 RGB -> masks (B, S, S) in [0, 1] and logits (B, K), or None for
        the logits of a masks-only model."""
        return self.backend(images)

    def submit(self, images: Sequence[Any], uint8_masks: bool = False) -> Pending:
        """`run` without waiting: (S, S, 3) uint8 images (arrays, or tensors on the device)
        -> a Pending whose `result()` is (masks, logits); masks as uint8 levels if asked."""
        return self.backend.submit(images, uint8_masks)

    def describe(
        self, masks: np.ndarray, logits: np.ndarray | None, sizes: list[tuple[int, int]]
    ) -> list[dict[str, Any]]:
        """Per image: box in original pixels, mask mean, label and score (JSON-ready); without
        logits (a masks-only model) no label fields at all, rather than empty ones.

        `masks` are floats in [0, 1] or uint8 levels (then boxes and means are those of the
        8-bit mask, as a PNG holds it).
        """
        masks = float_masks(masks)
        boxes = masks_to_boxes(masks)
        rows = [
            {
                "box": scale_box(box, self.image_size, width, height),
                "width": width,
                "height": height,
                "mask_mean": round(float(mask.mean()), 6),
            }
            for mask, box, (width, height) in zip(masks, boxes, sizes, strict=True)
        ]
        if logits is None:
            return rows
        probabilities = softmax(logits.astype(np.float64))
        for row, p in zip(rows, probabilities, strict=True):
            index = int(p.argmax())
            label, name = self.info.label(index)
            row |= {"label": label, "name": name, "class_index": index}
            row["score"] = round(float(p[index]), 6)
        return rows

    def predict(
        self, inputs: Any, batch_size: int | None = None, mask_size: str = "original"
    ) -> Prediction:
        """Masks, boxes and labels of images given as paths, arrays or tensors (the labels,
        names, indices and scores of a masks-only model are None).

        Args:
            inputs: one image or a list; see `to_uint8_image` for the accepted kinds.
            batch_size: images per model call (default: the one given to `load`).
            mask_size: `original` (each image's own size) or `model` (S x S).

        Raises:
            ValueError: an input is not an image (the message names it).
        """
        if mask_size not in ("original", "model"):
            raise ValueError(f"mask_size {mask_size!r}: choose original or model")
        items = _items(inputs)
        batch_size = batch_size or self.batch_size
        result = Prediction()
        for start in range(0, len(items), batch_size):
            decoded = [to_uint8_image(item, self.image_size) for item in items[start:][:batch_size]]
            masks, logits = self.run(np.stack([image for image, _, _ in decoded]))
            sizes = [(w, h) for _, w, h in decoded]
            for mask, row, (width, height) in zip(
                masks, self.describe(masks, logits, sizes), sizes, strict=True
            ):
                if mask_size == "original":
                    mask = resize_mask(mask, width, height)
                result.masks.append(mask)
                result.boxes.append(row["box"])
                result.labels.append(row.get("label"))  # None: a masks-only model
                result.names.append(row.get("name"))
                result.indices.append(row.get("class_index"))
                result.scores.append(row.get("score"))
        return result
