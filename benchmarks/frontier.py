"""The frontier: localisation quality against cost per image, for one classifier's explanations.

Usage: python benchmarks/frontier.py [--casm runs/demo/checkpoint.pt]
       [--classifier runs/demo-classifier/checkpoint.pt] [--data data/synth]
       [--mappings resnet18:32,resnet18:16,resnet18:8,mobilenet_v3_small:64] [--seed 0]
       [--images 500] [--tune-images 32] [--steps 300] [--batch 64] [--repeats 5]
Prints a table and writes benchmarks/results/frontier.json and frontier.png.

One classifier, the default recipe's (the demo CASM run's encoder), and the masks that explain
it, all scored on the same validation images in this one run:
- casm-shared: the demo CASM, whose decoder reads the classifier's own features, so a mask costs
  the classifier's forward and the decoder;
- mapping: mappings with an encoder of their own (`train --mapping-arch A --mapping-width W`),
  which need no classifier to make a mask. Each is trained here when its run is missing
  (runs/frontier-<arch>-w<width>-s<seed>), as the default recipe's CASM phase started from the
  demo classifier, and timed eager (masks only) and in ONNX Runtime, fp32 and int8
  (`casm-deploy export --masks-only`);
- gradcam: Grad-CAM of the classifier at the stage (2-4) with the best LE on these images;
- maskopt: Fong & Vedaldi's mask optimisation of the classifier, its fill and weights picked on
  `--tune-images` other images (method_cost.py's grid).
LE is eval's (masks binarised at their mean, largest component, IoU > 0.5); MaxBoxAccV2 is
casm_deploy.evaluation.boxacc's. Cost is milliseconds per image at batch `--batch`, the best of
`--repeats` passes (mask optimisation: one pass).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch
from common import command, machine, write_json
from frontier_plot import draw_frontier
from method_cost import (
    DEFAULT_GRID,
    Explainers,
    best_seconds,
    hits,
    load,
    localization_error,
    parse_grid,
    run_timed,
    spread,
    tune_maskopt,
)

from casm_deploy.checkpoint import load_checkpoint, load_masker
from casm_deploy.common.cpus import cpu_model
from casm_deploy.common.ui import console
from casm_deploy.config import ExportConfig, TrainConfig
from casm_deploy.data.imagenet import list_images
from casm_deploy.errors import UserError
from casm_deploy.evaluation.boxacc import BoxAccMeter
from casm_deploy.options import make_config

HERE = Path(__file__).resolve().parent
GRADCAM_STAGES = (2, 3, 4)
DEFAULT_MAPPINGS = "resnet18:32,resnet18:16,resnet18:8,mobilenet_v3_small:64"
PRECISIONS = ("fp32", "int8")


def parse_mappings(text: str) -> list[tuple[str, int]]:
    """`arch:width,...` -> [(arch, width), ...]."""
    pairs = []
    for entry in text.split(","):
        arch, width = entry.split(":")
        pairs.append((arch, int(width)))
    return pairs


def mapping_run(runs: Path, arch: str, width: int, seed: int) -> Path:
    return runs / f"frontier-{arch}-w{width}-s{seed}"


def train_mapping(args: argparse.Namespace, arch: str, width: int) -> Path:
    """The mapping's finished checkpoint, trained (or its run resumed) when it is not done."""
    from casm_deploy.training.train import run

    run_dir = mapping_run(Path(args.runs), arch, width, args.seed)
    checkpoint = run_dir / "checkpoint.pt"
    if checkpoint.is_file() and load_checkpoint(checkpoint)["phase"] == "done":
        return checkpoint
    console.print(f"training the {arch} mapping at width {width}: {run_dir}")
    config = make_config(
        TrainConfig,
        data=args.data,
        out=args.runs,
        name=run_dir.name,
        weights=args.classifier,
        pretrain_epochs=0,
        mapping_arch=arch,
        mapping_width=width,
        seed=args.seed,
        resume=checkpoint.is_file(),
    )
    run(config)
    return checkpoint


def quality(masks: torch.Tensor, boxes: list) -> dict:
    """LE and MaxBoxAccV2 of masks (N, 1, S, S) against each image's ground-truth boxes."""
    meter = BoxAccMeter()
    for mask, gt in zip(masks[:, 0].numpy(), boxes, strict=True):
        meter.add(mask, gt)
    return {"LE": localization_error(hits(masks, boxes)), **meter.result()}


def ort_seconds(path: Path, images: torch.Tensor, batch: int, repeats: int) -> float:
    """The best of `repeats` passes of an ONNX file over `images` in ONNX Runtime (CPU)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    chunks = [images[i : i + batch].contiguous().numpy() for i in range(0, len(images), batch)]
    session.run(None, {name: chunks[0]})  # warm-up
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        for chunk in chunks:
            session.run(None, {name: chunk})
        best = min(best, time.perf_counter() - began)
    return best


def export_onnx(checkpoint: Path, out: Path, precision: str, data: str) -> tuple[Path, bool]:
    """`casm-deploy export CHECKPOINT --onnx --masks-only --precision P`: the file, and whether
    it passed the parity check against the eager mapping."""
    from casm_deploy.deploy.export.job import run

    config = make_config(
        ExportConfig,
        checkpoint=str(checkpoint),
        out=str(out),
        data=data,
        onnx=True,
        torchscript=False,
        precision=precision,
        masks_only=True,
    )
    result = run(config)
    return out / result["files"]["onnx"]["file"], result["parity"]["passed"]


def ms(seconds: float, images: int) -> float:
    return round(1000 * seconds / images, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--casm", default="runs/demo/checkpoint.pt", help="the shared CASM")
    parser.add_argument(
        "--classifier",
        default="runs/demo-classifier/checkpoint.pt",
        help="where the mappings' CASM phase starts (the CASM's own start)",
    )
    parser.add_argument("--data", default="data/synth")
    parser.add_argument("--runs", default="runs", help="where the mapping runs are")
    parser.add_argument("--mappings", default=DEFAULT_MAPPINGS, help="arch:width,...")
    parser.add_argument("--seed", type=int, default=0, help="of the mapping runs")
    parser.add_argument("--images", type=int, default=500, help="scored, by every method")
    parser.add_argument("--tune-images", type=int, default=32, help="mask optimisation's grid")
    parser.add_argument("--steps", type=int, default=300, help="mask optimisation Adam steps")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="best of, for the fast methods")
    parser.add_argument("--out", default=str(HERE / "results" / "frontier.json"))
    args = parser.parse_args()

    mappings = {
        f"{arch}-w{width}": train_mapping(args, arch, width)
        for arch, width in parse_mappings(args.mappings)
    }
    shared, spec = load_masker(args.casm)
    shared = shared.to(memory_format=torch.channels_last)
    size, wnids, data = spec.image_size, list(spec.wnids), Path(args.data)
    samples = list_images(data, "val", wnids)
    scored = spread(list(range(len(samples))), args.images)
    tune = spread([i for i in range(len(samples)) if i not in set(scored)], args.tune_images)
    images, labels, boxes = load([samples[i] for i in scored], size, wnids, data / "annotations")
    tune_set = load([samples[i] for i in tune], size, wnids, data / "annotations")
    explainers = Explainers(shared, "predicted", args.steps)
    rows = []

    def add(name: str, kind: str, method, **extra) -> dict:
        masks = run_timed(method, images, labels, args.batch)[0]
        seconds = best_seconds(method, images, labels, args.batch, args.repeats)
        row = {"method": name, "kind": kind, **quality(masks, boxes)}
        row |= {"ms_per_image": ms(seconds, len(images)), **extra}
        console.print(row)
        rows.append(row)
        return row

    add("casm-shared", "casm-shared", explainers.casm)
    with tempfile.TemporaryDirectory() as folder:
        for name, checkpoint in mappings.items():
            masker = load_masker(checkpoint)[0].masks_only()
            masker = masker.to(memory_format=torch.channels_last)

            @torch.inference_mode()
            def eager(batch, _labels, masker=masker):
                return masker(batch), None

            extra = {}
            for precision in PRECISIONS:
                out = Path(folder) / name / precision
                try:
                    path, passed = export_onnx(checkpoint, out, precision, args.data)
                except UserError as error:  # recorded: a file that cannot be made is a result
                    console.print(f"{name} {precision}: {error}")
                    extra[f"ms_per_image_ort_{precision}"] = None
                    extra[f"ort_{precision}_error"] = str(error)
                    continue
                seconds = ort_seconds(path, images, args.batch, args.repeats)
                extra[f"ms_per_image_ort_{precision}"] = ms(seconds, len(images))
                extra[f"ort_{precision}_parity_passed"] = passed
            add(f"mapping {name}", "mapping", eager, checkpoint=str(checkpoint), **extra)

    gradcam = [add(f"gradcam stage {s}", "gradcam", explainers.gradcam(s)) for s in GRADCAM_STAGES]
    best = min(gradcam, key=lambda row: row["LE"])
    rows = [row for row in rows if row["kind"] != "gradcam" or row is best]

    setting, grid = tune_maskopt(explainers, *tune_set, parse_grid(DEFAULT_GRID))
    masks, seconds = run_timed(explainers.maskopt(setting), images, labels, args.batch)
    rows.append(
        {
            "method": "maskopt",
            "kind": "maskopt",
            **quality(masks, boxes),
            "ms_per_image": ms(seconds, len(images)),
            "setting": setting,
        }
    )

    targets = frontier_targets(rows)
    print_table(rows, targets)
    plot = Path(args.out).with_suffix(".png")
    draw_frontier(rows, plot, f"{len(images)} validation images of {data}, {cpu_model()}")
    write_json(
        args.out,
        {
            "command": command("frontier.py", args),
            "machine": {**machine(ort), "cpu_model": cpu_model()},
            "images": len(images),
            "gradcam_stages_tried": list(GRADCAM_STAGES),
            "maskopt_grid": grid,
            "rows": rows,
            "targets": targets,
            "plot": plot.name,
        },
    )


def frontier_targets(rows: list[dict]) -> dict:
    """Issue 17's targets, for each mapping: cost against Grad-CAM, LE against the CASM's and
    both metrics against Grad-CAM's best stage."""
    by_kind = {row["kind"]: row for row in rows if row["kind"] != "mapping"}
    casm, gradcam = by_kind["casm-shared"], by_kind["gradcam"]
    targets = {}
    for row in (r for r in rows if r["kind"] == "mapping"):
        eager = gradcam["ms_per_image"] / row["ms_per_image"]
        int8_ms = row["ms_per_image_ort_int8"]
        int8 = None if int8_ms is None else gradcam["ms_per_image"] / int8_ms
        targets[row["method"]] = {
            "cheaper_than_gradcam_eager": round(eager, 2),
            "cheaper_than_gradcam_ort_int8": None if int8 is None else round(int8, 2),
            "LE_above_casm": round(row["LE"] - casm["LE"], 4),
            "met": eager >= 3
            and int8 is not None
            and int8 >= 5
            and row["LE"] <= casm["LE"] + 0.03
            and row["LE"] < gradcam["LE"]
            and row["MaxBoxAccV2"] > gradcam["MaxBoxAccV2"],
        }
    return targets


def print_table(rows: list[dict], targets: dict) -> None:
    def cell(value) -> str:
        return "-" if value is None else f"{value:.3f}"

    print(f"\n{'method':<34}{'LE':>7}{'MaxBoxAccV2':>13}{'ms eager':>10}{'ms ORT':>9}{'int8':>8}")
    for row in rows:
        print(
            f"{row['method']:<34}{cell(row['LE']):>7}{cell(row['MaxBoxAccV2']):>13}"
            f"{cell(row['ms_per_image']):>10}{cell(row.get('ms_per_image_ort_fp32')):>9}"
            f"{cell(row.get('ms_per_image_ort_int8')):>8}"
        )
    for name, target in targets.items():
        print(f"{name}: {target}")


if __name__ == "__main__":
    main()
