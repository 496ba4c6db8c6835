"""The images export checks and calibrates on: parity images, and int8 calibration batches.

export.run -> resolve_data (the checkpoint's training data, or --data) -> parity_images (val
images, then random ones) -> parity_run; calibration_source / calibration_batches (training
images) -> precision.quantize_int8.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from casm_deploy.data.imagenet import list_images
from casm_deploy.data.torch_loader import ImageDataset
from casm_deploy.errors import UserError

CALIBRATION_BATCH = 16


def resolve_data(data: str, checkpoint: dict[str, Any], checkpoint_path: Path) -> Path:
    """The data folder: `data` if given, else the checkpoint's training data.

    A relative training path is looked up from the working directory, then from each folder
    above the checkpoint (a run trained in /x with data/synth lives in /x/runs/<name>/).

    Raises:
        UserError: the folder is not found.
    """
    if data:
        if not Path(data).is_dir():
            raise UserError(f"--data {data}: no such folder")
        return Path(data)
    trained = (checkpoint.get("config") or {}).get("data")
    if not trained:
        raise UserError(
            f"{checkpoint_path}: the checkpoint does not name its data; parity needs real "
            "images: pass --data DIR (an ImageNet-layout folder of its classes)"
        )
    candidates = [Path(trained)]
    if not Path(trained).is_absolute():
        candidates += [folder / trained for folder in checkpoint_path.resolve().parents]
    for folder in candidates:
        if folder.is_dir():
            return folder
    raise UserError(
        f"{checkpoint_path}: its training data {trained!r} is not here (looked in the working "
        "directory and above the checkpoint); parity needs real images: pass --data DIR"
    )


def _spread(samples: list[Any], count: int) -> list[Any]:
    """`count` items spread evenly over `samples` (sorted by class: every class is drawn)."""
    if count >= len(samples):
        return list(samples)
    picks = np.linspace(0, len(samples) - 1, num=count).round().astype(int)
    return [samples[i] for i in picks]


def _load(samples: list[tuple[Path, int]], size: int) -> np.ndarray:
    """Decode, shorter side to `size`, centre crop: (N, 3, S, S) float32 in [0, 1]."""
    dataset = ImageDataset(samples, size, train=False)
    images = np.stack([dataset[i][0] for i in range(len(dataset))])  # (N, S, S, 3) uint8
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / 255


def parity_images(
    data: Path, wnids: list[str], size: int, real: int, random: int, seed: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """`real` validation images (topped up from train when val is smaller), then `random` ones.

    Returns:
        images (N, 3, S, S) float32 in [0, 1], real first; and where they came from.

    Raises:
        UserError: the folder has fewer than `real` images of the model's classes.
    """
    samples = _spread(list_images(data, "val", wnids), real)
    source = {"data": str(data), "val": len(samples), "train": 0, "random": random}
    if len(samples) < real:
        train = list_images(data, "train", wnids) if (data / "train").is_dir() else []
        extra = _spread(train, real - len(samples))
        if len(samples) + len(extra) < real:
            raise UserError(
                f"{data}: {len(samples) + len(extra)} images of the model's classes; "
                f"parity needs {real}"
            )
        samples += extra
        source["train"] = len(extra)
    noise = np.random.default_rng(seed).random((random, 3, size, size), dtype=np.float32)
    return np.concatenate([_load(samples, size), noise]), {**source, "real": real}


def calibration_source(data: Path, wnids: list[str], count: int) -> list[tuple[Path, int]]:
    """The training images that calibrate int8 activations, spread over the classes."""
    return _spread(list_images(data, "train", wnids), count)


def calibration_batches(samples: list[tuple[Path, int]], size: int) -> list[np.ndarray]:
    """The images in equal batches (ONNX Runtime's histogram calibrators stack them)."""
    images = _load(samples, size)
    batch = min(CALIBRATION_BATCH, len(images))
    return [images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)]
