"""Explaining a ResNet-50 at 224 px: this project's masks against the tools users already run.

Usage: python benchmarks/peers.py [--images 128] [--latency-images 16] [--batch 64]
       [--repeats 3] [--jpegs 1000] [--threads N] [--calibration-images 32]
       [--model-only-images 320] [--mappings mobilenet_v3_small:64,resnet18:64,...]
       [--small-mapping auto] [--quick] [--out benchmarks/results/peers.json]
Prints a table and writes benchmarks/results/peers.json and peers.png (beside --out).

All on the same images in one run, with the same threads (`--threads`, default: the CPUs this
process may use: torch's threads and ONNX Runtime's intra-op threads). Every network has random
weights: a trained model costs what a random one does (same operations, same shapes), so no
download is needed. The ResNet-50 explained is one network: its weights are saved once and
loaded by every method.
- pytorch-grad-cam (the `grad-cam` package, pinned in pyproject.toml): `GradCAM` on
  `layer4[-1]` of torchvision's ResNet-50, the predicted class (targets=None), eager, as its
  README writes it (it back-propagates into every weight and the input: what users pay);
- Captum (when installed: the `dev` extra; its rows are skipped with the reason otherwise):
  `LayerGradCam` on `layer4[-1]` with relu_attributions, for the predicted class, which Captum
  needs as a target, so a forward of its own as its tutorials do, then
  `LayerAttribution.interpolate` to 224 px and a division by each map's maximum;
- gradcam: this project's Grad-CAM (`casm_deploy.evaluation.gradcam`) at stage 4, eager;
- casm-shared: the CASM whose decoder reads the ResNet-50's own features (`save_untrained`,
  arch resnet50, width 64): eager, TorchScript, ONNX Runtime fp32 and int8;
- mapping: masks-only mappings with encoders of their own (`--mappings`, arch:width), exported
  with `--masks-only`: eager, ONNX Runtime fp32 and int8. Their checkpoints carry a tiny
  stand-in classifier (ResNet-18 at width 8), which neither a masks-only export nor the eager
  masks-only model contains.
The project's eager models run channels-last, as its eager backend does; torchvision's model
for pytorch-grad-cam and Captum runs as users build it. The files are written by the export
module's functions without the parity check (`export_masker`, as infer.py's 224 case, then
`precision.quantize_int8` calibrated on `--calibration-images` of the generated JPEGs): parity
is export's own test, and on random weights says nothing about a trained model's files.

Cost: milliseconds per image at batch `--batch` over `--images` images and at batch 1 over
`--latency-images`, the best of `--repeats` passes after a warm-up call, each method and
runtime in a fresh process. Peak memory (`peak_rss_mb`): the kernel's resident-set high-water
mark (VmHWM) of that process while it runs that batch size, reset (/proc/self/clear_refs)
after the model and the images are loaded: the whole process (interpreter, libraries, weights,
images) at its highest, where `rss_before_mb` is the same process just before.

End to end from files: `--jpegs` generated JPEGs of ImageNet's sizes (375-500 px on the longer
side, 4:3 or 3:4, textures with grain; in a temporary folder, never kept):
(a) `casm-deploy infer DIR --model <small mapping, ONNX fp32> --batch B` with PNG masks (its
    default: each mask at its image's size), images/s from its summary.json;
(b) the loop a user writes with pytorch-grad-cam: decode (cv2.imread), resize to 224, batches
    of B, GradCAM, one 8-bit PNG per image (224 px), images/s over the whole loop;
(c) `casm-deploy infer` with the shared ResNet-50 CASM in ONNX Runtime fp32 (PNG masks), and
    the same file's images/s on in-memory batches (`Masker.run`, `--model-only-images`).
infer runs with `--workers --threads --device cpu`; its ONNX Runtime session keeps ONNX
Runtime's default threads (one per physical core).

The ratios against issue 31's targets: the small mapping (`--small-mapping`, default the
fastest in ONNX Runtime fp32 at batch B) eager and in ONNX Runtime (the faster of fp32 and
int8) against pytorch-grad-cam eager at batch B (20x, 30x); the shared CASM eager against it
(2x); (a) against (b) (10x); (c) infer against model-only (0.9x).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from common import command, machine, write_json
from peers_plot import draw_peers

HERE = Path(__file__).resolve().parent
SIZE = 224
CLASSES = 1000
DEFAULT_MAPPINGS = "mobilenet_v3_small:64,resnet18:64,resnet18:32,resnet18:16"
STAND_IN = ("resnet18", 8)  # the mapping checkpoints' classifier, which masks-only drops
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
PGC = "pytorch-grad-cam GradCAM"
CAPTUM = "Captum LayerGradCam"
GRADCAM = "Grad-CAM (casm_deploy), stage 4"
CASM = "CASM ResNet-50, shared encoder"
QUICK = {
    "images": 2,
    "latency_images": 2,
    "batch": 2,
    "repeats": 1,
    "jpegs": 8,
    "calibration_images": 2,
    "model_only_images": 8,
}
TARGETS = {
    "mapping_vs_pytorch_grad_cam_eager": 20,
    "mapping_ort_vs_pytorch_grad_cam_eager": 30,
    "casm_shared_vs_pytorch_grad_cam_eager": 2,
    "infer_mapping_vs_gradcam_loop": 10,
    "infer_resnet50_vs_model_only": 0.9,
}


# --- the worker: one method and runtime in a fresh process ------------------------------------


def normalize(images: torch.Tensor) -> torch.Tensor:
    """ImageNet's normalisation, as a user's transform does it."""
    return (images - MEAN) / STD


def status_mb(key: str) -> float:
    """A line of /proc/self/status (VmRSS, VmHWM) in MB."""
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith(f"{key}:"))
    return round(kb / 1024, 1)


def reset_peak() -> bool:
    """Free what can be freed, then reset the high-water mark to the current RSS."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def torchvision_resnet50(weights: str) -> torch.nn.Module:
    from torchvision.models import resnet50

    model = resnet50(num_classes=CLASSES)
    model.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval()


def pgc_method(model: torch.nn.Module) -> Callable:
    from pytorch_grad_cam import GradCAM

    cam = GradCAM(model=model, target_layers=[model.layer4[-1]])
    return lambda images: cam(input_tensor=normalize(images), targets=None)


def captum_method(model: torch.nn.Module) -> Callable:
    from captum.attr import LayerAttribution, LayerGradCam

    layer_gradcam = LayerGradCam(model, model.layer4[-1])

    def run(images: torch.Tensor) -> torch.Tensor:
        inputs = normalize(images)
        with torch.no_grad():
            target = model(inputs).argmax(1)
        maps = layer_gradcam.attribute(inputs, target=target, relu_attributions=True)
        maps = LayerAttribution.interpolate(maps, tuple(images.shape[-2:]), "bilinear")
        return maps / maps.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)

    return run


def ort_method(path: str, threads: int) -> Callable:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda images: session.run(None, {name: images.numpy()})


def build_method(spec: dict) -> Callable[[torch.Tensor], Any]:
    """images (B, 3, S, S) float32 in [0, 1] -> the method's masks (any form). Each imports
    what it needs alone: the process's memory is the method's."""
    kind, runtime = spec["kind"], spec["runtime"]
    if runtime.startswith("ort"):
        return ort_method(spec["model"], spec["threads"])
    if kind == "pytorch-grad-cam":
        return pgc_method(torchvision_resnet50(spec["weights"]))
    if kind == "captum":
        return captum_method(torchvision_resnet50(spec["weights"]))
    if runtime == "torchscript":
        from casm_deploy.artifact import load_torchscript

        module = load_torchscript(Path(spec["model"]), torch.device("cpu"))
    else:
        from casm_deploy.checkpoint import load_masker

        masker = load_masker(spec["model"])[0]
        module = masker.masks_only() if kind == "mapping" else masker
        module = module.eval().to(memory_format=torch.channels_last)
        if kind == "gradcam":
            from casm_deploy.evaluation.gradcam import gradcam

            return lambda images: gradcam(module, images, 4)[0]
    return torch.inference_mode()(lambda images: module(images))


def timed(run: Callable, images: torch.Tensor, batch: int, repeats: int) -> dict:
    """The best of `repeats` passes over `images` at `batch`, after a warm-up call, and the
    process's resident memory before and at its highest meanwhile."""
    chunks = [images[i : i + batch] for i in range(0, len(images), batch)]
    reset = reset_peak()
    before = status_mb("VmRSS")
    run(chunks[0])
    best = math.inf
    for _ in range(repeats):
        began = time.perf_counter()
        for chunk in chunks:
            run(chunk)
        best = min(best, time.perf_counter() - began)
    return {
        "batch": batch,
        "images": len(images),
        "ms_per_image": round(1000 * best / len(images), 4),
        "peak_rss_mb": status_mb("VmHWM"),
        "rss_before_mb": before,
        "peak_since": "this batch size" if reset else "process start",
    }


def gradcam_loop(spec: dict) -> dict:
    """(b): the loop a user writes with pytorch-grad-cam, from JPEG files to PNG files."""
    from pytorch_grad_cam import GradCAM

    model = torchvision_resnet50(spec["weights"])
    cam = GradCAM(model=model, target_layers=[model.layer4[-1]])
    files = sorted(Path(spec["folder"]).glob("*.jpg"))
    out = Path(spec["out"])
    out.mkdir(parents=True)
    batch, size = spec["batch"], spec["size"]
    began = time.perf_counter()
    for start in range(0, len(files), batch):
        paths = files[start : start + batch]
        pixels = []
        for path in paths:
            image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
            pixels.append(cv2.resize(image, (size, size)))
        images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float().div(255)
        cams = cam(input_tensor=normalize(images), targets=None)
        for path, mask in zip(paths, cams, strict=True):
            cv2.imwrite(str(out / f"{path.stem}.png"), np.uint8(255 * mask))
    seconds = time.perf_counter() - began
    return {
        "images": len(files),
        "seconds": round(seconds, 3),
        "images_per_second": round(len(files) / seconds, 2),
        "peak_rss_mb": status_mb("VmHWM"),
    }


def worker(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    if spec["kind"] == "loop":
        result: Any = gradcam_loop(spec)
    else:
        pixels = torch.from_numpy(np.load(spec["images"]))  # (N, S, S, 3) uint8
        images = pixels.permute(0, 3, 1, 2).float().div(255).contiguous()
        run = build_method(spec)
        result = [
            timed(run, images[:count], batch, spec["repeats"])
            for batch, count in spec["batches"]  # batch 1 first: its peak is the lower
        ]
    Path(spec["result"]).write_text(json.dumps(result))


def in_worker(spec: dict, folder: Path) -> Any:
    """Run `spec` in a fresh interpreter (this script's worker) and return its result."""
    name = f"{len(list(folder.glob('*.json')))}"
    spec_path, result = folder / f"{name}.json", folder / f"{name}.result"
    spec_path.write_text(json.dumps({**spec, "result": str(result)}))
    subprocess.run([sys.executable, __file__, "--worker", str(spec_path)], check=True)
    return json.loads(result.read_text())


# --- the files: JPEGs, checkpoints, exports ---------------------------------------------------


def write_jpegs(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` JPEGs of ImageNet's sizes: longer side 375-500 px, 4:3 (or 3:4), smooth colour
    fields at three scales plus grain, quality 90 (about the bytes per pixel of photos)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(count):
        long = int(rng.integers(375, 501))
        short = round(0.75 * long)
        width, height = (long, short) if rng.random() < 0.7 else (short, long)
        image = np.full((height, width, 3), 128, np.float32)
        for cells, amplitude in ((3, 140), (12, 70), (48, 35)):
            noise = rng.random((cells, cells, 3), dtype=np.float32) - 0.5
            image += amplitude * cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC)
        image += rng.normal(0, 6, image.shape).astype(np.float32)
        path = folder / f"{k:05d}.jpg"
        cv2.imwrite(
            str(path), np.clip(image, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90]
        )
        paths.append(path)
    return paths


def make_int8(fp32: Path, path: Path, batches: list[np.ndarray]) -> str | None:
    """The int8 file of `fp32` (None), or why it cannot be made (a result to record)."""
    from casm_deploy.artifact import read_metadata
    from casm_deploy.deploy.export.precision import quantize_int8

    images = sum(len(b) for b in batches)
    meta = {
        **read_metadata(fp32),
        "precision": "int8",
        "exporter": "torch.onnx.export (dynamo) + onnxruntime static QDQ, per channel, "
        f"calibrated on {images} generated JPEGs",
    }
    try:
        quantize_int8(fp32, path, batches, meta)
    except Exception as error:  # recorded: a file that cannot be made is a result
        print(f"{path}: int8 failed: {error}")
        return f"{type(error).__name__}: {error}"
    return None


def prepare_models(folder: Path, mappings: list[tuple[str, int]], calibration: list) -> dict:
    """The shared CASM's checkpoint, weights and files, and each mapping's."""
    from casm_deploy.checkpoint import load_checkpoint, save_untrained
    from casm_deploy.deploy.export.exporters import export_masker

    wnids = [f"n{k:08d}" for k in range(CLASSES)]
    names = [f"class {k}" for k in range(CLASSES)]
    casm = folder / "casm-resnet50"
    checkpoint = save_untrained(casm / "checkpoint.pt", wnids, names, arch="resnet50", width=64)
    weights = casm / "resnet50.pt"  # the classifier as torchvision's ResNet-50 state dict
    torch.save(load_checkpoint(checkpoint)["encoder"], weights)
    print("exporting the shared ResNet-50 CASM (TorchScript, ONNX fp32, int8)")
    files = export_masker(checkpoint, casm, ("torchscript", "onnx"))
    int8 = casm / "masker-int8.onnx"
    models = {
        CASM: {
            "kind": "casm-shared",
            "eager": checkpoint,
            "torchscript": files["torchscript"],
            "ort-fp32": files["onnx"],
            "ort-int8": int8,
            "errors": {"ort-int8": make_int8(files["onnx"], int8, calibration)},
        },
        "weights": weights,
    }
    for arch, width in mappings:
        name = f"mapping {arch}-w{width}"
        where = folder / f"{arch}-w{width}"
        print(f"exporting {name} (ONNX fp32, int8; masks only)")
        checkpoint = save_untrained(
            where / "checkpoint.pt",
            wnids,
            names,
            arch=STAND_IN[0],
            width=STAND_IN[1],
            mapping=(arch, width),
        )
        onnx = export_masker(checkpoint, where, ("onnx",), masks_only=True)["onnx"]
        int8 = where / "masker-int8.onnx"
        models[name] = {
            "kind": "mapping",
            "eager": checkpoint,
            "ort-fp32": onnx,
            "ort-int8": int8,
            "errors": {"ort-int8": make_int8(onnx, int8, calibration)},
        }
    return models


def calibration_batches(decoded: np.ndarray, count: int) -> list[np.ndarray]:
    """`count` images as float (N, 3, S, S) in [0, 1], in equal batches of up to 16."""
    images = decoded[:count].transpose(0, 3, 1, 2).astype(np.float32) / 255
    batch = min(16, len(images))
    return [images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)]


# --- the measurements -------------------------------------------------------------------------


def cases(models: dict, captum: bool) -> list[dict]:
    """Every method and runtime to time: method, kind, runtime, its file (and why it is
    missing, when it could not be made)."""
    weights, casm = str(models["weights"]), str(models[CASM]["eager"])
    found = [{"method": PGC, "kind": "pytorch-grad-cam", "runtime": "eager", "weights": weights}]
    if captum:
        found.append({"method": CAPTUM, "kind": "captum", "runtime": "eager", "weights": weights})
    found.append({"method": GRADCAM, "kind": "gradcam", "runtime": "eager", "model": casm})
    for name, files in models.items():
        if name == "weights":
            continue
        for runtime in ("eager", "torchscript", "ort-fp32", "ort-int8"):
            if runtime in files:
                found.append(
                    {
                        "method": name,
                        "kind": files["kind"],
                        "runtime": runtime,
                        "model": str(files[runtime]),
                        "error": files["errors"].get(runtime),
                    }
                )
    return found


def measure(case: dict, args: argparse.Namespace, images: Path, work: Path) -> list[dict]:
    """The case's rows, one per batch size (batch 1 first), each with its figures."""
    batches = [(1, args.latency_images)] + ([(args.batch, args.images)] if args.batch > 1 else [])
    row = {key: case[key] for key in ("method", "kind", "runtime")}
    if case.get("error"):
        missing = {"ms_per_image": None, "peak_rss_mb": None, "error": case["error"]}
        return [{**row, "batch": b, **missing} for b, _ in batches]
    print(f"timing {case['method']}, {case['runtime']}")
    spec = {
        **case,
        "threads": args.threads,
        "images": str(images),
        "batches": batches,
        "repeats": args.repeats,
    }
    return [{**row, **figures} for figures in in_worker(spec, work)]


def infer_rate(model: Path, folder: Path, out: Path, args: argparse.Namespace) -> dict:
    """`casm-deploy infer FOLDER --model MODEL` with PNG masks: images/s from summary.json."""
    script = Path(sys.executable).with_name("casm-deploy")
    program = [str(script)] if script.is_file() else [sys.executable, "-m", "casm_deploy"]
    options = ["--model", str(model), "--batch", str(args.batch), "--out", str(out)]
    options += ["--device", "cpu", "--workers", str(args.threads)]
    done = subprocess.run(
        [*program, "infer", str(folder), *options], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(
            f"infer failed ({done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    summary = json.loads((out / "summary.json").read_text())
    if summary["error"]:
        raise SystemExit(f"{folder}: {summary['error']} files failed; benchmark images must decode")
    return {
        "images": summary["ok"],
        "images_per_second": summary["images_per_second"],
        "backend": summary["backend"],
        "provider": summary["provider"],
        "precision": summary["precision"],
        "masks": "png",
    }


def model_only_rate(model: Path, images: np.ndarray, batch: int, repeats: int) -> float:
    """Images/s of the file in infer's runtime (`Masker.run`) on in-memory uint8 batches."""
    from casm_deploy.deploy.runtime.masker import Masker

    masker = Masker.load(model, device="cpu")
    masker.run(images[:batch])  # warm-up
    best = math.inf
    for _ in range(repeats):
        began = time.perf_counter()
        for start in range(0, len(images), batch):
            masker.run(images[start : start + batch])
        best = min(best, time.perf_counter() - began)
    return len(images) / best


def pick(rows: list[dict], method: str, runtime: str, batch: int) -> dict | None:
    return next(
        (r for r in rows if (r["method"], r["runtime"], r["batch"]) == (method, runtime, batch)),
        None,
    )


def small_mapping(rows: list[dict], choice: str, batch: int) -> str:
    """The mapping of the end-to-end run and the ratios: named, or the fastest in ONNX Runtime
    fp32 at `batch`."""
    if choice != "auto":
        arch, width = choice.split(":")
        return f"mapping {arch}-w{width}"
    timed_rows = [
        r
        for r in rows
        if r["kind"] == "mapping" and r["runtime"] == "ort-fp32" and r["batch"] == batch
    ]
    timed_rows = [r for r in timed_rows if r["ms_per_image"] is not None]
    if not timed_rows:
        raise SystemExit("no mapping was timed in ONNX Runtime fp32")
    return min(timed_rows, key=lambda r: r["ms_per_image"])["method"]


def ratio(numerator: float | None, denominator: float | None, target: float, of: str) -> dict:
    value = None if not numerator or not denominator else numerator / denominator
    return {
        "value": None if value is None else round(value, 3),
        "target": target,
        "met": value is not None and value >= target,
        "of": of,
    }


def ratios(rows: list[dict], small: str, batch: int, end_to_end: dict) -> dict:
    """Issue 31's ratios (higher is better), each with its target and whether it is met."""

    def ms(method: str, runtime: str) -> float | None:
        row = pick(rows, method, runtime, batch)
        return None if row is None else row["ms_per_image"]

    pgc = ms(PGC, "eager")
    fastest_ort = min(
        (r for r in ("ort-fp32", "ort-int8") if ms(small, r) is not None),
        key=lambda r: ms(small, r),
        default="ort-fp32",
    )
    e2e = end_to_end
    return {
        "mapping_vs_pytorch_grad_cam_eager": ratio(
            pgc, ms(small, "eager"), TARGETS["mapping_vs_pytorch_grad_cam_eager"],
            f"pytorch-grad-cam eager ms / {small} eager ms, batch {batch}",
        ),
        "mapping_ort_vs_pytorch_grad_cam_eager": ratio(
            pgc, ms(small, fastest_ort), TARGETS["mapping_ort_vs_pytorch_grad_cam_eager"],
            f"pytorch-grad-cam eager ms / {small} {fastest_ort} ms, batch {batch}",
        ),
        "casm_shared_vs_pytorch_grad_cam_eager": ratio(
            pgc, ms(CASM, "eager"), TARGETS["casm_shared_vs_pytorch_grad_cam_eager"],
            f"pytorch-grad-cam eager ms / shared CASM eager ms, batch {batch}",
        ),
        "infer_mapping_vs_gradcam_loop": ratio(
            e2e["infer_images_per_s"], e2e["gradcam_loop_images_per_s"],
            TARGETS["infer_mapping_vs_gradcam_loop"],
            f"infer images/s ({small}, ONNX Runtime fp32, PNG) / pytorch-grad-cam loop images/s",
        ),
        "infer_resnet50_vs_model_only": ratio(
            e2e["infer_resnet50_png_images_per_s"], e2e["model_only_resnet50_images_per_s"],
            TARGETS["infer_resnet50_vs_model_only"],
            "infer images/s (shared ResNet-50 CASM, ONNX Runtime fp32, PNG) / model-only images/s",
        ),
    }  # fmt: skip


def cpu_flags() -> dict:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    return {
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
    }


def library(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def print_table(rows: list[dict], batch: int, end_to_end: dict, found: dict) -> None:
    print(f"\nms per image at {SIZE} px (random weights: a trained model costs the same)")
    head = f"{'method':<36}{'runtime':<13}{f'batch {batch}':>10}{'batch 1':>10}"
    print(head + f"{f'peak MB b{batch}':>14}{'peak MB b1':>12}")
    for row in rows:
        if row["batch"] != 1:
            continue
        big = pick(rows, row["method"], row["runtime"], batch) or {}

        def cell(value) -> str:
            return "-" if value is None else f"{value:.3g}"

        def mb(value) -> str:
            return "-" if value is None else f"{value:.0f}"

        print(
            f"{row['method']:<36}{row['runtime']:<13}{cell(big.get('ms_per_image')):>10}"
            f"{cell(row['ms_per_image']):>10}{mb(big.get('peak_rss_mb')):>14}"
            f"{mb(row.get('peak_rss_mb')):>12}"
        )
    print(f"\nend to end: {json.dumps(end_to_end)}")
    for name, r in found.items():
        print(f"{name}: {r['value']} (target {r['target']}x, {'met' if r['met'] else 'missed'})")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128, help="in memory, timed at --batch")
    parser.add_argument("--latency-images", type=int, default=16, help="timed at batch 1")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="best of, after a warm-up")
    parser.add_argument("--jpegs", type=int, default=1000, help="generated, end to end")
    parser.add_argument(
        "--threads", type=int, default=0, help="0: the CPUs this process may use (OMP_NUM_THREADS)"
    )
    parser.add_argument("--calibration-images", type=int, default=32, help="int8 calibration")
    parser.add_argument("--model-only-images", type=int, default=320, help="end to end (c)")
    parser.add_argument("--mappings", default=DEFAULT_MAPPINGS, help="arch:width,...")
    parser.add_argument("--small-mapping", default="auto", help="arch:width, or auto")
    parser.add_argument("--quick", action="store_true", help="a smoke run: " + str(QUICK))
    parser.add_argument("--out", default=str(HERE / "results" / "peers.json"))
    args = parser.parse_args()
    if args.quick:
        vars(args).update(QUICK)
    if not args.threads:  # the CPUs this process may use, at most OMP_NUM_THREADS when set
        from casm_deploy.common.cpus import usable_cpus

        limit = os.environ.get("OMP_NUM_THREADS", "")
        args.threads = min(usable_cpus(), int(limit) if limit.isdigit() and int(limit) else 10**6)
    return args


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        worker(Path(sys.argv[2]))
        return
    args = parse_args()
    import onnxruntime

    from casm_deploy.common.cpus import cpu_model, usable_cpus
    from casm_deploy.data.decode import read_image

    torch.set_num_threads(args.threads)
    mappings = [(a, int(w)) for a, w in (e.split(":") for e in args.mappings.split(","))]
    captum = importlib.util.find_spec("captum") is not None
    skipped = (
        []
        if captum
        else [
            {
                "method": CAPTUM,
                "reason": "captum is not installed (pip install captum, or the dev extra)",
            }
        ]
    )
    for entry in skipped:
        print(f"skipping {entry['method']}: {entry['reason']}")
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        work = Path(tmp)
        (work / "specs").mkdir()
        print(f"writing {args.jpegs} JPEGs")
        files = write_jpegs(work / "jpegs", args.jpegs)
        needed = max(
            args.images, args.latency_images, args.calibration_images, args.model_only_images
        )
        decoded = np.stack([read_image(files[k % len(files)], SIZE)[0] for k in range(needed)])
        images = work / "images.npy"
        np.save(images, decoded[: max(args.images, args.latency_images)])
        models = prepare_models(
            work, mappings, calibration_batches(decoded, args.calibration_images)
        )
        rows = []
        for case in cases(models, captum):
            rows += measure(case, args, images, work / "specs")
        small = small_mapping(rows, args.small_mapping, args.batch)
        print(f"end to end: infer with {small}, the pytorch-grad-cam loop, infer with the CASM")
        infer_small = infer_rate(
            models[small]["ort-fp32"], work / "jpegs", work / "out-small", args
        )
        loop = in_worker(
            {
                "kind": "loop",
                "weights": str(models["weights"]),
                "folder": str(work / "jpegs"),
                "out": str(work / "out-loop"),
                "batch": args.batch,
                "size": SIZE,
                "threads": args.threads,
            },
            work / "specs",
        )
        infer_casm = infer_rate(models[CASM]["ort-fp32"], work / "jpegs", work / "out-casm", args)
        alone = model_only_rate(
            models[CASM]["ort-fp32"], decoded[: args.model_only_images], args.batch, args.repeats
        )
    end_to_end = {
        "jpegs": args.jpegs,
        "small_mapping": small,
        "infer_images_per_s": infer_small["images_per_second"],
        "gradcam_loop_images_per_s": loop["images_per_second"],
        "infer_resnet50_png_images_per_s": infer_casm["images_per_second"],
        "model_only_resnet50_images_per_s": round(alone, 2),
        "infer_mapping": infer_small,
        "gradcam_loop": loop,
        "infer_resnet50": infer_casm,
        "model_only_images": min(args.model_only_images, len(decoded)),
    }
    found = ratios(rows, small, args.batch, end_to_end)
    print_table(rows, args.batch, end_to_end, found)
    out = Path(args.out)
    plot = out.with_suffix(".png")
    threads = f"{args.threads} thread{'s' if args.threads > 1 else ''}"
    caption = f"{cpu_model() or 'CPU'}, {threads}, random weights (a trained model costs the same)"
    draw_peers(rows, args.batch, plot, caption)
    write_json(
        out,
        {
            "benchmark": "peers",
            "command": command("peers.py", args),
            "machine": {
                **machine(onnxruntime),
                "cpu_model": cpu_model(),
                "usable_cpus": usable_cpus(),
                **cpu_flags(),
            },
            "libraries": {name: library(name) for name in ("grad-cam", "captum", "torchvision")},
            "settings": {
                "image_size": SIZE,
                "images": args.images,
                "latency_images": args.latency_images,
                "batch": args.batch,
                "repeats": args.repeats,
                "threads": args.threads,
                "calibration_images": args.calibration_images,
                "weights": "random (a trained model costs the same)",
                "parity": "not checked (export_masker and quantize_int8, no parity run)",
                "peak_rss": "VmHWM of the method's own process while it runs that batch size",
            },
            "rows": rows,
            "skipped": skipped,
            "end_to_end": end_to_end,
            "ratios": found,
            "plot": plot.name,
        },
    )


if __name__ == "__main__":
    main()
