"""Peak memory of one image at infer's pixel limit: what one decoding or writing thread needs.

Usage: python benchmarks/image_memory.py [--megapixels 120] [--size 224] [--side 512]
Prints a table and writes benchmarks/results/image_memory.json.

Files at the limit (4:3, a JPEG and a PNG of a smooth picture with some noise, as photos are)
are made in a temporary folder; then each step runs alone in a fresh interpreter, which
reports its peak resident memory (the kernel's high-water mark, VmHWM; getrusage's ru_maxrss
would start at this parent's peak) after the imports and after the step:
read_image (the model's input, S x S), the mask written as infer's writer does it (an S x S
uint8 mask resized to the original size and PNG-encoded), and read_overlay (the overlay's
image, longest side `--side`). The peak above the imports is what each image in flight adds.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
from common import command, machine, write_json

from casm_deploy.data.imagefiles import MAX_PIXELS

STEP = """
import json, sys, time
import cv2, numpy as np
from casm_deploy.data.decode import read_image, read_overlay

def peak():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024

path, size, side, width, height = sys.argv[1], *map(int, sys.argv[2:])
before = peak()
start = time.perf_counter()
if STEP == "read_image":
    read_image(path, size, max_pixels=width * height)
elif STEP == "write_mask":
    mask = np.random.default_rng(0).integers(0, 256, (size, size), dtype=np.uint8)
    full = cv2.resize(mask, (width, height), interpolation=cv2.INTER_LINEAR)
    ok, png = cv2.imencode(".png", full)
elif STEP == "read_overlay":
    read_overlay(path, side, max_pixels=width * height)
seconds = time.perf_counter() - start
print(json.dumps({"imports_mb": before, "peak_mb": peak(), "seconds": seconds}))
"""


def picture(width: int, height: int) -> np.ndarray:
    """A smooth BGR picture with mild noise: compresses as a photo does, not as a flat fill."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 248, (48, 64, 3), dtype=np.uint8)
    image = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
    image += rng.integers(0, 9, (height, 1, 1), dtype=np.uint8)  # per row: cheap, no overflow
    return image


def measure(step: str, path: Path, args: argparse.Namespace, width: int, height: int) -> dict:
    code = textwrap.dedent(STEP).replace("STEP ==", f"{step!r} ==")
    argv = [str(path), str(args.size), str(args.side), str(width), str(height)]
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True
    )
    result = json.loads(done.stdout)
    result["added_mb"] = result["peak_mb"] - result["imports_mb"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megapixels", type=float, default=MAX_PIXELS / 1e6)
    parser.add_argument("--size", type=int, default=224, help="the model's input side S")
    parser.add_argument("--side", type=int, default=512, help="the overlay's longest side")
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "image_memory.json")
    )
    args = parser.parse_args()

    pixels = int(args.megapixels * 1e6)
    width = math.isqrt(pixels * 4 // 3)
    height = pixels // width
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        image = picture(width, height)
        files = {}
        for kind, suffix in (("JPEG", ".jpg"), ("PNG", ".png")):
            files[kind] = Path(tmp) / f"limit{suffix}"
            start = time.perf_counter()
            cv2.imwrite(str(files[kind]), image)
            print(f"{kind} {width}x{height}: {time.perf_counter() - start:.1f} s to write")
        del image
        steps = [
            ("read_image", "JPEG"),
            ("read_image", "PNG"),
            ("write_mask", "PNG"),
            ("read_overlay", "JPEG"),
            ("read_overlay", "PNG"),
        ]
        for step, kind in steps:
            path = files[kind]
            result = measure(step, path, args, width, height)
            source = "-" if step == "write_mask" else kind
            file_mb = "-" if step == "write_mask" else round(path.stat().st_size / 1e6, 1)
            rows.append({"step": step, "file": source, "file_mb": file_mb, **result})

    print(f"\n{width} x {height} = {width * height / 1e6:.1f} MP, S = {args.size}, "
          f"overlay side {args.side}; MB of resident memory")  # fmt: skip
    header = f"{'step':<14}{'file':<6}{'file MB':>9}{'imports':>9}{'peak':>8}{'added':>8}{'s':>7}"
    print(header)
    for r in rows:
        print(
            f"{r['step']:<14}{r['file']:<6}{r['file_mb']!s:>9}{r['imports_mb']:>9.0f}"
            f"{r['peak_mb']:>8.0f}{r['added_mb']:>8.0f}{r['seconds']:>7.2f}"
        )
    result = {
        "command": command("image_memory.py", args),
        "machine": machine(cv2),
        "settings": {**vars(args), "width": width, "height": height},
        "rows": rows,
    }
    write_json(args.out, result)


if __name__ == "__main__":
    main()
