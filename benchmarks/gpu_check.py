"""The project's CUDA checks in one run, for a lent GPU machine: figures and pass/fail as JSON.

Usage: python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.json] [--small]
(`benchmarks/gpu_check.sh` runs it with a time limit.) Sections, each skipped with the reason
when what it needs is missing (DALI and onnxruntime-gpu are not on the lent machines):

1. CASM training steps/s, ResNet-50 at 224 px, batch 128: fp32 contiguous against AMP (bf16,
   and fp16 with its gradient scaler) with channels-last.
2. Exports on CUDA with their parity checks: TorchScript fp32 and fp16, ONNX fp32.
3. Mask extraction images/s: eager and TorchScript (fp32, fp16) at batch 256, 224 px; ONNX
   Runtime's CUDA provider where installed; `infer` end to end from JPEG files.
4. The `gpu`-marked tests (pytest -m gpu).

`--small` runs every section at toy sizes on whatever device there is (a CPU dry run that
catches mistakes before GPU time is spent).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from common import write_json

ROOT = Path(__file__).resolve().parent.parent


def section(results: dict, name: str, job: Callable[[], dict]) -> None:
    """Run one section; record its figures, or why it was skipped, or its error."""
    started = time.perf_counter()
    print(f"== {name}", flush=True)
    try:
        results[name] = job()
    except ModuleNotFoundError as error:
        results[name] = {"skipped": f"{error.name} is not installed"}
    except Exception as error:
        results[name] = {"error": f"{type(error).__name__}: {error}"}
        traceback.print_exc()
    results[name]["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(results[name], indent=1), flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_steps(device: torch.device, args: argparse.Namespace) -> dict:
    from casm_deploy.config import TrainConfig
    from casm_deploy.model import build_masker
    from casm_deploy.train import CASM

    arch, size, batch = ("resnet18", 64, 8) if args.small else ("resnet50", 224, 128)
    amps = ["off", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    figures = {"arch": arch, "image_size": size, "batch": batch, "preset": "L"}
    for amp in amps:
        channels_last = amp != "off"
        torch.manual_seed(0)
        masker = build_masker(arch, 1000, 64).to(device)
        images = torch.rand(batch, 3, size, size, device=device)
        if channels_last:
            masker = masker.to(memory_format=torch.channels_last)
            images = images.contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, 1000, (batch,), device=device)
        cfg = TrainConfig(reproduce="L", amp=amp, channels_last=channels_last)
        casm = CASM(masker, cfg, random.Random(0))
        for _ in range(2):
            casm.step(images, labels)
        synchronize(device)
        steps, start = (2 if args.small else 10), time.perf_counter()
        for _ in range(steps):
            out = casm.step(images, labels)
        synchronize(device)
        rate = steps / (time.perf_counter() - start)
        layout = "channels-last" if channels_last else "contiguous"
        losses = (out.loss_clean, out.loss_masked, out.loss_mapping)
        figures[f"{amp} {layout}"] = {
            "steps_per_second": round(rate, 2),
            "images_per_second": round(rate * batch, 1),
            "losses_finite": all(map(math.isfinite, losses)),
        }
    return figures


def small_data(folder: Path) -> Path:
    """A synth set with 70 validation images (parity needs 64) and a few training ones."""
    from casm_deploy.config import SynthConfig
    from casm_deploy.synth import generate

    data = folder / "synth"
    generate(
        SynthConfig(out=str(data), train_per_class=4, val_per_class=7, workers=1), progress=False
    )
    return data


def checkpoint(folder: Path, data: Path, size: int, width: int) -> Path:
    """A random-weight mapping of the real schema (costs what a trained one costs)."""
    from casm_deploy.checkpoint import save_untrained
    from casm_deploy.data import read_classes

    info = read_classes(data)
    return save_untrained(
        folder / "checkpoint.pt", info.wnids, info.names, width=width, image_size=size,
        config={"data": str(data)},
    )  # fmt: skip


def exports(device: torch.device, work: Path, data: Path, size: int) -> dict:
    from casm_deploy import export
    from casm_deploy.config import ExportConfig

    ckpt = checkpoint(work, data, size, 64)
    figures = {}
    for precision in ("fp32", "fp16"):
        out = work / f"export-{precision}"
        cfg = ExportConfig(
            checkpoint=str(ckpt),
            out=str(out),
            onnx=precision == "fp32",
            precision=precision,
            device=device.type,
            data=str(data),
        )
        report = export.run(cfg)["parity"]
        figures[precision] = {
            "passed": report["passed"],
            "files": {
                r["file"]: {"status": r["status"], "backend": r.get("backend")}
                | {k: r["worst"][k] for k in ("max_abs_mask", "mean_abs_mask") if r.get("worst")}
                for r in report["results"]
            },
        }
    return figures


def extraction(device: torch.device, work: Path, data: Path, size: int, args) -> dict:
    import numpy as np

    from casm_deploy import infer
    from casm_deploy.config import InferConfig
    from casm_deploy.predict import Masker

    batch = 16 if args.small else 256
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    models = {
        "eager fp32": work / "checkpoint.pt",
        "torchscript fp32": work / "export-fp32" / "masker.ts",
        "torchscript fp16": work / "export-fp16" / "masker.ts",
        "onnx fp32": work / "export-fp32" / "masker.onnx",
    }
    figures: dict = {"batch": batch, "image_size": size}
    for name, path in models.items():
        if not path.is_file():
            figures[name] = {"skipped": f"{path.name} was not exported"}
            continue
        try:
            masker = Masker.load(path, device=device.type)
        except Exception as error:  # e.g. ONNX Runtime without the CUDA provider
            figures[name] = {"skipped": str(error)}
            continue
        masker.run(images)
        repeats, start = (2 if args.small else 20), time.perf_counter()
        for _ in range(repeats):
            masker.run(images)
        rate = repeats * batch / (time.perf_counter() - start)
        figures[name] = {"provider": masker.info.provider, "images_per_second": round(rate, 1)}
    with tempfile.TemporaryDirectory() as out:
        model = models["torchscript fp16" if device.type == "cuda" else "torchscript fp32"]
        cfg = InferConfig(
            dir=str(data / "val"), model=str(model), out=out, batch=batch, device=device.type
        )
        summary = infer.run(cfg)
        figures["infer end to end (JPEG files, OpenCV decode)"] = {
            "model": model.name,
            "files": summary["files"],
            "images_per_second": summary["images_per_second"],
        }
    return figures


def gpu_tests() -> dict:
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    lines = done.stdout.strip().splitlines()
    return {"returncode": done.returncode, "summary": lines[-1] if lines else done.stderr[-500:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    parser.add_argument("--small", action="store_true", help="toy sizes, any device")
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if not cuda and not args.small:
        print("no CUDA device: nothing to check (use --small for a CPU dry run)")
        return
    device = torch.device("cuda" if cuda else "cpu")
    results: dict = {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "small": args.small,
    }
    size = 64 if args.small else 224
    section(results, "training steps", lambda: train_steps(device, args))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = small_data(work)
        section(results, "exports", lambda: exports(device, work, data, size))
        section(results, "mask extraction", lambda: extraction(device, work, data, size, args))
    if not args.skip_tests:
        section(results, "gpu tests", gpu_tests)
    write_json(args.out, results)


if __name__ == "__main__":
    main()
