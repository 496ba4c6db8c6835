"""End-to-end `casm-deploy infer` against the model alone: does decoding hide behind compute?

Usage: python benchmarks/infer.py [--export export/default] [--data data/synth/train]
       [--images 4096] [--batch 256] [--backends onnx,torchscript]
Prints a table and writes benchmarks/results/infer.json. Model-only runs the same backend on
the same images, already decoded and resized in memory, at the same batch size; end-to-end is
`infer.run` from files on disk to PNG masks and boxes.jsonl (and once with --masks none).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from casm_deploy import infer
from casm_deploy.config import InferConfig
from casm_deploy.images import read_image, scan
from casm_deploy.predict import Masker
from casm_deploy.ui import console

FILES = {"onnx": "masker.onnx", "torchscript": "masker.ts"}


def model_only(masker: Masker, images: np.ndarray, batch: int) -> float:
    """Images per second of the backend alone, after one warm-up batch."""
    masker.run(images[:batch])
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        masker.run(images[i : i + batch])
    return len(images) / (time.perf_counter() - start)


def end_to_end(model: Path, folder: Path, batch: int, masks: str) -> float:
    """Images per second of `infer.run` (its processing loop, as summary.json reports it)."""
    with tempfile.TemporaryDirectory() as out:
        cfg = InferConfig(dir=str(folder), model=str(model), out=out, batch=batch, masks=masks)
        summary = infer.run(cfg)
    assert summary["error"] == 0, "benchmark images must all decode"
    return summary["images_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", default="export/default", help="casm-deploy export's OUT")
    parser.add_argument("--data", default="data/synth/train", help="a folder of images")
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--backends", default="onnx,torchscript")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "infer.json"))
    args = parser.parse_args()

    entries = list(islice(scan(args.data), args.images))
    if len(entries) < args.images:
        raise SystemExit(f"{args.data}: {len(entries)} images, the benchmark wants {args.images}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"  # exactly these files, as links: infer reads a folder
        for entry in entries:
            link = folder / entry.rel
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(entry.path.resolve())
        for backend in args.backends.split(","):
            model = Path(args.export) / FILES[backend]
            if not model.is_file():
                raise SystemExit(f"{model}: missing; run `make demo` or casm-deploy export first")
            masker = Masker.load(model, device="cpu")
            images = np.stack([read_image(e.path, masker.image_size)[0] for e in entries])
            alone = model_only(masker, images, args.batch)
            png = end_to_end(model, folder, args.batch, "png")
            bare = end_to_end(model, folder, args.batch, "none")
            rows.append(
                {
                    "backend": backend,
                    "precision": masker.info.precision,
                    "batch": args.batch,
                    "model_only": round(alone, 1),
                    "end_to_end_png": round(png, 1),
                    "end_to_end_no_masks": round(bare, 1),
                    "ratio_png": round(png / alone, 3),
                    "ratio_no_masks": round(bare / alone, 3),
                }
            )
    console.print(f"{args.images} images of {args.data}, batch {args.batch}, images/s")
    header = f"{'backend':<12}{'model only':>12}{'infer png':>12}{'ratio':>8}"
    print(header + f"{'infer none':>12}{'ratio':>8}")
    for r in rows:
        print(
            f"{r['backend']:<12}{r['model_only']:>12.0f}{r['end_to_end_png']:>12.0f}"
            f"{r['ratio_png']:>8.2f}{r['end_to_end_no_masks']:>12.0f}{r['ratio_no_masks']:>8.2f}"
        )
    import onnxruntime

    result = {
        "command": "python benchmarks/infer.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
