"""The redundancy check of `data synth --parts`: does a classifier trained on clean images still
classify with any one part removed, and does it lean on the favourite part most?

Usage: python benchmarks/parts_check.py [--data DIR] [--num-classes 5] [--train-per-class 1000]
       [--val-per-class 60] [--parts 3] [--pretrain-epochs 10] [--width 32] [--seed 0]
Prints a table and writes benchmarks/results/parts_check.json.

Generates a parts set (or reuses --data if it holds the same one), trains a classifier on it
(`train --classifier-only`, the default recipe's model at 64 px), then classifies the
validation images rendered in memory with nothing removed and with each part k removed
(`synth.make_parts_sample(..., drop=k)`), JPEG-encoded like the files and resized like the
validation loader. The check passes when the accuracy stays high (>= 80% of the clean accuracy)
with any single part removed, and is lowest with the favourite part removed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from common import command, machine, write_json

from casm_deploy.checkpoint import load_masker
from casm_deploy.config import SynthConfig, TrainConfig
from casm_deploy.data import center_crop, read_classes, resize_shorter
from casm_deploy.synth import (
    FAVOURITE,
    JPEG_QUALITY,
    PART_KINDS,
    SHAPES,
    generate,
    make_parts_sample,
)
from casm_deploy.train import run as train
from casm_deploy.ui import console

KEEP_SHARE = 0.8  # "stays high": at least this share of the clean accuracy with a part removed


def as_loaded(image: np.ndarray, size: int) -> np.ndarray:
    """An RGB image as the validation loader sees its JPEG file: (size, size, 3) uint8."""
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    _, jpeg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    decoded = cv2.cvtColor(cv2.imdecode(jpeg, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return center_crop(resize_shorter(decoded, size), size)


@torch.no_grad()
def accuracy(masker, cfg: SynthConfig, classes: list[int], size: int, drop: int | None) -> float:
    correct = total = 0
    for label, k in enumerate(classes):
        images = [
            as_loaded(make_parts_sample(cfg, "val", k, i, drop)[0], size)
            for i in range(cfg.val_per_class)
        ]
        batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
        _, logits = masker(batch)
        correct += int((logits.argmax(1) == label).sum())
        total += len(images)
    return correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="", help="parts set folder (default: a temporary one)")
    parser.add_argument("--num-classes", type=int, default=5)
    parser.add_argument("--train-per-class", type=int, default=1000)
    parser.add_argument("--val-per-class", type=int, default=60)
    parser.add_argument("--parts", type=int, default=3)
    parser.add_argument("--pretrain-epochs", type=int, default=10)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/parts_check.json")
    args = parser.parse_args()

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data or Path(tmp) / "parts")
        cfg = SynthConfig(
            out=str(data),
            num_classes=args.num_classes,
            train_per_class=args.train_per_class,
            val_per_class=args.val_per_class,
            parts=args.parts,
            seed=args.seed,
        )
        generate(cfg)
        train_cfg = TrainConfig(
            data=str(data),
            out=tmp,
            name="parts-classifier",
            width=args.width,
            classifier_only=True,
            pretrain_epochs=args.pretrain_epochs,
            seed=args.seed,
        )
        run_dir = train(train_cfg)
        masker, _ = load_masker(run_dir / "checkpoint.pt")
        trained = time.perf_counter() - start

        wnids = read_classes(data).wnids
        classes = [SHAPES.index(name) for name in read_classes(data).names]
        assert len(classes) == len(wnids)
        size = train_cfg.image_size
        clean = accuracy(masker, cfg, classes, size, None)
        dropped = {PART_KINDS[k]: accuracy(masker, cfg, classes, size, k) for k in range(cfg.parts)}

    favourite = PART_KINDS[FAVOURITE]
    others = [acc for name, acc in dropped.items() if name != favourite]
    redundant = all(acc >= KEEP_SHARE * clean for acc in dropped.values())
    prefers = bool(others) and dropped[favourite] < min(others)
    console.print(f"classifier: {args.pretrain_epochs} epochs, {trained:.0f} s")
    console.print(f"{'val images':<32}{'accuracy':>9}")
    console.print(f"{'nothing removed':<32}{clean:>9.3f}")
    for name, acc in dropped.items():
        mark = " (favourite)" if name == favourite else ""
        console.print(f"{'without the ' + name + mark:<32}{acc:>9.3f}")
    console.print(f"redundant (each >= {KEEP_SHARE:.0%} of clean): {redundant}")
    console.print(f"prefers the favourite (lowest without it): {prefers}")
    write_json(
        args.out,
        {
            # An empty --data (a temporary set) is left out of the command, as a default.
            "command": command(
                "parts_check.py",
                argparse.Namespace(**{k: v for k, v in vars(args).items() if v != ""}),
            ),
            "machine": machine(),
            "cpu_model": cpu_model(),
            "seconds": round(time.perf_counter() - start, 1),
            "accuracy": {"clean": clean, "without": dropped},
            "favourite": favourite,
            "redundant": redundant,
            "prefers_favourite": prefers,
            "passed": redundant and prefers,
        },
    )


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return ""


if __name__ == "__main__":
    main()
