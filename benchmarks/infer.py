"""End-to-end `casm-deploy infer` against the model alone: does decoding hide behind compute?

Usage: python benchmarks/infer.py [--cases demo,224] [--images 8192] [--images-224 1024]
       [--batch 256]
Prints a table and writes benchmarks/results/infer.json.

Two cases: `demo`, the trained demo mapping (export/default, 64 px, half-width ResNet-18) on
the embedded data's ~100 px training images; `224`, a full-width ResNet-18 mapping at 224 px
(random weights cost what trained ones do) on generated 375-500 px JPEGs, ImageNet's sizes.
Model-only runs the same backend on the same images, decoded and resized in memory before the
clock starts, at the same batch size; end-to-end is `infer.run` from the files on disk to PNG
masks and boxes.jsonl (and once with --masks none). Also the CPU time per image of the model
(its images/s over all cores) and of infer's own stages, one thread each, which on a CPU-only
machine share the model's cores.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
from common import command, linked, machine, write_json

from casm_deploy.config import InferConfig, SynthConfig
from casm_deploy.data.decode import decode, read_image
from casm_deploy.data.imagefiles import read_encoded, scan
from casm_deploy.deploy.export.exporters import FILES, export_masker
from casm_deploy.deploy.infer import job as infer
from casm_deploy.deploy.infer import outputs
from casm_deploy.deploy.runtime.masker import Masker

BIG_DATA = Path("data/bench-infer-500")  # gitignored, like every data/ folder


def model_only(masker: Masker, images: np.ndarray, batch: int) -> float:
    """Images per second of the backend alone, after one warm-up batch."""
    masker.run(images[:batch])
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        masker.run(images[i : i + batch])
    return len(images) / (time.perf_counter() - start)


def stage_costs(masker: Masker, entries: list, writer_out: Path) -> dict[str, float]:
    """CPU milliseconds per image of infer's own stages, one thread, on up to 256 images."""
    entries = entries[:256]
    start = time.perf_counter()
    encoded = [read_encoded(e.path) for e in entries]
    read = time.perf_counter() - start
    start = time.perf_counter()
    images = np.stack([decode(data, w, h, masker.image_size) for data, w, h in encoded])
    decoded = time.perf_counter() - start
    masks, logits = masker.run(images)
    sizes = [(w, h) for _, w, h in encoded]
    start = time.perf_counter()
    rows = [
        masker.describe(masks[k : k + 1], logits[k : k + 1], [sizes[k]])[0]
        for k in range(len(entries))
    ]
    described = time.perf_counter() - start
    writer = outputs.Writer(writer_out)  # infer's defaults: PNG masks at each image's size
    start = time.perf_counter()
    for entry, mask, row in zip(entries, masks, rows, strict=True):
        writer.write(entry, mask, row)
    written = time.perf_counter() - start
    per_image = 1000 / len(entries)
    return {
        "read_and_check_ms": round(read * per_image, 3),
        "decode_and_resize_ms": round(decoded * per_image, 3),
        "box_and_label_ms": round(described * per_image, 3),
        "write_png_ms": round(written * per_image, 3),
    }


def end_to_end(model: Path, folder: Path, batch: int, masks: str) -> float:
    """Images per second of `infer.run` (its processing loop, as summary.json reports it)."""
    with tempfile.TemporaryDirectory(dir=".") as out:  # on the disk users write to
        cfg = InferConfig(dir=str(folder), model=str(model), out=out, batch=batch, masks=masks)
        summary = infer.run(cfg)
    if summary["error"]:
        raise SystemExit(f"{folder}: {summary['error']} files failed; benchmark images must decode")
    return summary["images_per_second"]


def export_224(folder: Path) -> Path:
    """A random-weight full-width ResNet-18 mapping at 224 px, exported without parity."""
    from casm_deploy.checkpoint import save_untrained
    from casm_deploy.data.imagenet import read_classes

    info = read_classes(BIG_DATA)
    checkpoint = save_untrained(folder / "checkpoint.pt", info.wnids, info.names)
    export_masker(checkpoint, folder, ("torchscript", "onnx"))
    return folder


def run_case(
    name: str, export: Path, data: Path, count: int, args: argparse.Namespace
) -> list[dict]:
    entries = list(islice(scan(data), count))
    if len(entries) < count:
        raise SystemExit(f"{data}: {len(entries)} images, the benchmark wants {count}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = linked(entries, Path(tmp) / "images")
        for backend in args.backends.split(","):
            model = export / FILES[backend]
            if not model.is_file():
                raise SystemExit(f"{model}: missing; run `make demo` or casm-deploy export first")
            masker = Masker.load(model, device="cpu")
            images = np.stack([read_image(e.path, masker.image_size)[0] for e in entries])
            alone = model_only(masker, images, args.batch)
            with tempfile.TemporaryDirectory(dir=".") as out:
                costs = stage_costs(masker, entries, Path(out))
            png = end_to_end(model, folder, args.batch, "png")
            bare = end_to_end(model, folder, args.batch, "none")
            rows.append(
                {
                    "case": name,
                    "backend": backend,
                    "image_size": masker.image_size,
                    "images": len(entries),
                    "batch": args.batch,
                    "model_only": round(alone, 1),
                    "end_to_end_png": round(png, 1),
                    "end_to_end_no_masks": round(bare, 1),
                    "ratio_png": round(png / alone, 3),
                    "ratio_no_masks": round(bare / alone, 3),
                    "model_core_ms": round(1000 * (os.cpu_count() or 1) / alone, 3),
                    "pipeline_core_ms": costs,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="demo,224")
    parser.add_argument("--export", default="export/default", help="the demo case's export")
    parser.add_argument("--data", default="data/synth/train", help="the demo case's images")
    parser.add_argument("--images", type=int, default=8192, help="the demo case's count")
    parser.add_argument("--images-224", type=int, default=1024, help="the 224 case's count")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--backends", default="onnx,torchscript")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "infer.json"))
    args = parser.parse_args()

    rows = []
    for case in args.cases.split(","):
        if case == "demo":
            rows += run_case(case, Path(args.export), Path(args.data), args.images, args)
            continue
        per_class = -(-args.images_224 // 10)
        cfg = SynthConfig(
            out=str(BIG_DATA), train_per_class=per_class, val_per_class=1, min_side=375,
            max_side=500, overwrite=True,
        )  # fmt: skip
        if sum(1 for _ in islice(scan(BIG_DATA / "train"), args.images_224)) < args.images_224:
            from casm_deploy.data.synth import generate

            generate(cfg, progress=True)
        with tempfile.TemporaryDirectory() as tmp:
            model = export_224(Path(tmp))
            rows += run_case(case, model, BIG_DATA / "train", args.images_224, args)

    print(f"\nimages/s, batch {args.batch}, {os.cpu_count()} CPU cores")
    print(f"{'case':<6}{'backend':<13}{'model only':>11}{'infer png':>11}{'ratio':>7}", end="")
    print(f"{'infer none':>12}{'ratio':>7}")
    for r in rows:
        print(
            f"{r['case']:<6}{r['backend']:<13}{r['model_only']:>11.0f}{r['end_to_end_png']:>11.0f}"
            f"{r['ratio_png']:>7.2f}{r['end_to_end_no_masks']:>12.0f}{r['ratio_no_masks']:>7.2f}"
        )
    print("\nCPU ms per image: the model (all cores) and infer's own stages (one thread)")
    for r in rows:
        stages = ", ".join(f"{k[:-3]} {v:.2f}" for k, v in r["pipeline_core_ms"].items())
        print(f"{r['case']:<6}{r['backend']:<13}model {r['model_core_ms']:.2f}; {stages}")
    import onnxruntime

    result = {
        "command": command("infer.py", args),
        "machine": machine(onnxruntime),
        "rows": rows,
    }
    write_json(args.out, result)


if __name__ == "__main__":
    main()
