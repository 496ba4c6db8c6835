"""Training data-loader throughput on this machine: DALI on the CPU against the torch DataLoader.

Usage: python benchmarks/loader.py [--threads 1 2] [--sizes 64 224] [--batch 64] [--repeats 3]
Prints a table and writes benchmarks/results/loader.json. Each row is one full training epoch
(decode, resize, random crop, flip, float batch) with pipeline / worker start-up included, as a
training run pays it; the best of `--repeats` epochs after one warm-up epoch. DALI gets as many
CPU threads as the DataLoader gets worker processes. The JPEG data is generated on first use:
the embedded data set's image sizes (shorter side 80-128 px) for 64 px, ImageNet-like ones
(shorter side 300-500 px) for 224 px.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
from common import write_json

from casm_deploy.config import SynthConfig
from casm_deploy.data.imagenet import read_classes
from casm_deploy.data.loader import build_loader
from casm_deploy.data.synth import generate

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("torch", "dali")
# image size -> (data folder, shorter sides, images per class over 8 classes)
DATA = {
    64: ("data/bench-loader-64", (80, 128), 128),
    224: ("data/bench-loader-224", (300, 500), 64),
}


def ensure_data(size: int) -> Path:
    folder, (min_side, max_side), per_class = DATA[size]
    out = ROOT / folder
    generate(
        SynthConfig(
            out=str(out),
            num_classes=8,
            train_per_class=per_class,
            val_per_class=1,
            min_side=min_side,
            max_side=max_side,
        ),
        progress=False,
    )
    return out


def epoch_rate(loader) -> float:
    """Images per second over one epoch, start-up included."""
    start = time.perf_counter()
    seen = 0
    for images, _, _ in loader:
        seen += len(images)
    return seen / (time.perf_counter() - start)


def measure(root: Path, size: int, threads: int, args: argparse.Namespace) -> dict[str, float]:
    """Best epoch rate of each loader; their epochs alternate, so load from elsewhere hits both."""
    wnids = read_classes(root).wnids
    loaders = {
        kind: build_loader(
            root, "train", wnids, size, args.batch, train=True, workers=threads, loader=kind
        )
        for kind in KINDS
    }
    rates = {kind: [] for kind in KINDS}
    for epoch in range(args.repeats + 1):  # epoch 0 warms the page cache and lazy imports
        for kind, loader in loaders.items():
            loader.set_epoch(epoch)
            rates[kind].append(epoch_rate(loader))
    return {kind: max(values[1:]) for kind, values in rates.items()}


def versions() -> dict:
    import cv2
    import nvidia.dali

    return {"torch": torch.__version__, "dali": nvidia.dali.__version__, "opencv": cv2.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224], choices=sorted(DATA))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "loader.json"))
    args = parser.parse_args()

    load_before = os.getloadavg()[0]  # other work on the machine skews the figures: record it
    rows = []
    print(f"{'size':>5}{'threads':>9}{'torch img/s':>13}{'dali img/s':>12}{'dali/torch':>12}")
    for size in args.sizes:
        root = ensure_data(size)
        for threads in args.threads:
            rate = measure(root, size, threads, args)
            for kind, value in rate.items():
                rows.append(
                    {"size": size, "threads": threads, "loader": kind, "images_per_second": value}
                )
            ratio = rate["dali"] / rate["torch"]
            print(f"{size:>5}{threads:>9}{rate['torch']:>13.0f}{rate['dali']:>12.0f}{ratio:>12.2f}")
    result = {
        "benchmark": "loader",
        "settings": vars(args),
        "data": {
            size: {"folder": f, "shorter_side": s, "images": 8 * n}
            for size, (f, s, n) in DATA.items()
        },
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "gpu": torch.cuda.is_available(),
            "load_average_1min": [load_before, os.getloadavg()[0]],  # before, after
            **versions(),
        },
        "rows": rows,
    }
    write_json(args.out, result)


if __name__ == "__main__":
    main()
