"""The redundancy check of `data synth --parts`: does a classifier trained on clean images still
classify with any one part removed, and does it lean on the favourite part most?

Usage: python benchmarks/parts_check.py [--data DIR] [--num-classes 5] [--train-per-class 1000]
       [--val-per-class 60] [--parts 3] [--pretrain-epochs 10] [--width 32] [--seed 0]
       python benchmarks/parts_check.py --classifier CKPT --data DIR [--out JSON]
Prints a table and writes benchmarks/results/parts_check.json (or --out).

Generates a parts set (or reuses --data if it holds the same one), trains a classifier on it
(`train --classifier-only`, the default recipe's model at 64 px), then classifies the
validation images rendered in memory with nothing removed and with each part k removed
(`parts.make_parts_sample(..., drop=k)`), JPEG-encoded like the files and resized like the
validation loader. With `--classifier`, the given checkpoint is checked instead, on the
validation images of the parts set `--data` made (as its synth.json records it), with no
training: `make experiments` checks each seed's classifier so. The check passes when the
accuracy stays high (>= 80% of the clean accuracy) with any single part removed, and is
lowest with the favourite part removed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from common import command, machine, write_json

from casm_deploy.checkpoint import load_masker
from casm_deploy.common.cpus import cpu_model
from casm_deploy.common.ui import console
from casm_deploy.config import SynthConfig, TrainConfig, config_from_dict
from casm_deploy.data.draw import SHAPES
from casm_deploy.data.parts import FAVOURITE, PART_KINDS, make_parts_sample
from casm_deploy.data.synth import JPEG_QUALITY, generate
from casm_deploy.data.transforms import center_crop, resize_shorter
from casm_deploy.training.train import run as train

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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="", help="parts set folder (default: a temporary one)")
    parser.add_argument("--num-classes", type=int, default=5)
    parser.add_argument("--train-per-class", type=int, default=1000)
    parser.add_argument("--val-per-class", type=int, default=60)
    parser.add_argument("--parts", type=int, default=3)
    parser.add_argument("--pretrain-epochs", type=int, default=10)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classifier", default="", help="check this checkpoint; no training")
    parser.add_argument("--out", default="benchmarks/results/parts_check.json")
    args = parser.parse_args(argv)
    if args.classifier and not args.data:
        parser.error("--classifier needs --data, the parts set it was trained on")
    return args


def main() -> None:
    args = parse_args()

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.classifier:  # check a trained classifier on the set it was trained on
            record = json.loads(Path(args.data, "synth.json").read_text())
            cfg = config_from_dict(SynthConfig, record["config"])
            checkpoint = Path(args.classifier)
            epochs = "given"
        else:
            cfg = SynthConfig(
                out=str(Path(args.data or Path(tmp) / "parts")),
                num_classes=args.num_classes,
                train_per_class=args.train_per_class,
                val_per_class=args.val_per_class,
                parts=args.parts,
                seed=args.seed,
            )
            generate(cfg)
            train_cfg = TrainConfig(
                data=cfg.out,
                out=tmp,
                name="parts-classifier",
                width=args.width,
                classifier_only=True,
                pretrain_epochs=args.pretrain_epochs,
                seed=args.seed,
            )
            checkpoint = train(train_cfg) / "checkpoint.pt"
            epochs = f"{args.pretrain_epochs} epochs"
        if not cfg.parts:
            raise SystemExit(f"{cfg.out} is not a parts set (data synth --parts)")
        masker, spec = load_masker(checkpoint)
        trained = time.perf_counter() - start

        # The classifier's outputs in the order of its own classes (its wnids).
        classes = [SHAPES.index(spec.names[j]) for j in range(len(spec.wnids))]
        size = spec.image_size
        clean = accuracy(masker, cfg, classes, size, None)
        dropped = {PART_KINDS[k]: accuracy(masker, cfg, classes, size, k) for k in range(cfg.parts)}

    favourite = PART_KINDS[FAVOURITE]
    others = [acc for name, acc in dropped.items() if name != favourite]
    redundant = all(acc >= KEEP_SHARE * clean for acc in dropped.values())
    prefers = bool(others) and dropped[favourite] < min(others)
    console.print(f"classifier {checkpoint.parent.name}: {epochs}, {trained:.0f} s")
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


if __name__ == "__main__":
    main()
