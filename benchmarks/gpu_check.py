"""The project's CUDA checks in one run, for a lent GPU machine: figures and pass/fail as JSON.

Usage: bash benchmarks/gpu_check.sh (from the repository root; it runs this script under a
time limit), or python benchmarks/gpu_check.py [--out FILE] [--small] [--device auto|cpu|cuda]
[--budget SECONDS] [--skip-tests]. The JSON (benchmarks/results/gpu_check.json by default) is
rewritten after every section and every item of one, so a run stopped by its time limit keeps
what it finished; a section still running when it stopped says so (`incomplete`). Each section
has a time cap, and the items it has no time left for are recorded as skipped.

Sections, each recording its figures, or `skipped` with the reason (DALI and onnxruntime-gpu
are not installed on the lent machines), or `error`:

- data: ImageNet-sized JPEGs (shorter side 375-500 px) in the ImageNet layout, from the
  embedded generator; training, the loaders and `infer` read them.
- training: CASM (preset L100, its pool drawn from) of a ResNet-50 at 224 px, batch 128, in
  fp32 (PyTorch's TF32 settings, and TF32 off), bf16 and fp16 AMP, each channels-last and
  contiguous: images/s of `casm.step` alone on a device batch and of the real epoch loop
  (`train.casm_one_epoch` over the torch loader), peak GPU memory, the host syncs per step, the
  pool's draws and, for fp16, the gradient scaler's final scale and skipped updates. Host
  syncs are counted with CUDA's sync debug mode over a few steps. Contiguous means weights and
  batches: the loader's batches are channels-last, and cuDNN runs a convolution channels-last
  when either its input or its weight is, so they are made contiguous on the device.
- loader: the torch loader's images/s (and DALI's, where installed) at 224 px with 8 and 16
  workers, against the training step's rate.
- parity: a planted mapping (a smooth mask of the image's colourful region) exported on CUDA
  to TorchScript fp32 / fp16 / bf16 (and ONNX fp32 where ONNX Runtime has CUDA), each checked
  against eager fp32 by `casm-deploy export`'s parity check.
- extraction: mask extraction images/s of that ResNet-50 mapping at batch 256: eager fp32 and
  AMP (bf16, fp16), TorchScript fp32 / fp16 / bf16, ONNX Runtime where it has CUDA; model only
  (a float batch already on the device) and with the copies (a uint8 host batch in, masks and
  logits back on the host).
- infer: `casm-deploy infer` end to end over the training JPEGs: masks off and PNG masks with
  the decoder `auto` picks, and masks off with torchvision's (nvJPEG) and OpenCV decoding.
- gpu tests: every `gpu`-marked test (pytest -m gpu), with each test's outcome.

`--small` shrinks every size (a ResNet-18 at width 8, 64 px, a few images): the whole script
then runs in about 25 s on 2 idle CPU cores, to check the script itself (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import command, machine, write_json

from casm_deploy.common.cpus import cpu_model

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("data", "training", "loader", "parity", "extraction", "infer", "gpu tests")


@dataclass(frozen=True)
class Sizes:
    """Everything `--small` shrinks, and each section's time cap in seconds."""

    arch: str = "resnet50"
    width: int = 64
    image_size: int = 224
    classes: int = 10
    train_per_class: int = 300  # 3,000 training JPEGs: the loaders' epochs and infer's folder
    val_per_class: int = 10  # parity needs 64 real images
    min_side: int = 375
    max_side: int = 500
    train_batch: int = 128
    train_workers: int = 16
    warmup_steps: int = 3  # casm.step alone, before the counted and the timed steps
    sync_steps: int = 3  # steps run with CUDA's sync debug mode on, alone and in the loop
    timed_steps: int = 10  # casm.step alone
    epoch_steps: int = 16  # the timed epoch of casm_one_epoch
    loader_workers: tuple[int, ...] = (8, 16)
    loader_batches: int = 20
    extract_batch: int = 256
    extract_warmup: int = 3
    extract_seconds: float = 1.5  # each measurement: about this long, at most extract_iters
    extract_iters: int = 30
    parity_random: int = 16
    infer_batch: int = 256
    caps: dict[str, float] = field(
        default_factory=lambda: {
            "data": 60,
            "training": 170,
            "loader": 40,
            "parity": 60,
            "extraction": 70,
            "infer": 60,
            "gpu tests": 150,
        }
    )


SMALL = Sizes(
    arch="resnet18",
    width=8,
    image_size=64,
    classes=3,
    train_per_class=16,
    val_per_class=22,
    min_side=40,
    max_side=56,
    train_batch=8,
    train_workers=1,
    warmup_steps=1,
    sync_steps=1,
    timed_steps=2,
    epoch_steps=3,
    loader_workers=(0, 1),
    loader_batches=4,
    extract_batch=16,
    extract_seconds=0.1,
    extract_iters=3,
    parity_random=4,
    infer_batch=16,
    caps={
        "data": 30,
        "training": 40,
        "loader": 20,
        "parity": 40,
        "extraction": 30,
        "infer": 20,
        "gpu tests": 60,
    },
)

# name: (amp, channels_last, TF32 off). fp32 runs with PyTorch's TF32 settings (recorded:
# convolutions in TF32, matmuls not, by default) and once with TF32 off. Most telling first,
# so that a cap leaves out the least.
TRAIN_CONFIGS: dict[str, tuple[str, bool, bool]] = {
    "bf16 channels-last": ("bf16", True, False),
    "fp16 channels-last": ("fp16", True, False),
    "fp32 channels-last": ("off", True, False),
    "bf16 contiguous": ("bf16", False, False),
    "fp16 contiguous": ("fp16", False, False),
    "fp32 contiguous": ("off", False, False),
    "fp32 channels-last, TF32 off": ("off", True, True),
}


class Skip(Exception):
    """A section or an item that cannot run here; the message is the reason."""


class Cap:
    """A section's time cap (never past the whole run's budget)."""

    def __init__(self, seconds: float, deadline: float):
        self.seconds = seconds
        self.end = min(time.monotonic() + seconds, deadline)

    def left(self) -> float:
        return self.end - time.monotonic()

    def check(self) -> None:
        if self.left() <= 0:
            raise Skip(f"the section's time cap ({self.seconds:g} s) was reached")


@dataclass
class Context:
    """What the sections share: the device, the sizes, the work folder and the results."""

    args: argparse.Namespace
    sizes: Sizes
    device: torch.device
    work: Path
    deadline: float
    results: dict
    data: Path | None = None
    planted: Path | None = None
    exports: dict[str, dict] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def save(self) -> None:
        write_json(self.args.out, self.results)


# --- the run's frame --------------------------------------------------------------------------


def section(ctx: Context, name: str, job: Callable[[Context, Cap, dict], None]) -> None:
    """Run one section into its own dict of figures; record why it was skipped, or its error.

    The dict is in the results (marked `incomplete`) while the section runs, so that the JSON
    written after each of its items shows how far it got if the run is stopped.
    """
    started = time.perf_counter()
    print(f"== {name}", flush=True)
    figures: dict[str, Any] = {"incomplete": "the run stopped inside this section"}
    ctx.results["sections"][name] = figures
    cap = Cap(ctx.sizes.caps[name], ctx.deadline)
    try:
        if cap.left() <= 0:
            raise Skip(f"the run's budget ({ctx.args.budget:g} s) was spent")
        job(ctx, cap, figures)
    except Skip as reason:
        figures.clear()
        figures["skipped"] = str(reason)
    except ModuleNotFoundError as error:
        figures.clear()
        figures["skipped"] = f"{error.name} is not installed"
    except Exception as error:
        figures["error"] = f"{type(error).__name__}: {error}"
        traceback.print_exc()
    figures.pop("incomplete", None)
    figures["seconds"] = round(time.perf_counter() - started, 1)
    figures["cap_seconds"] = cap.seconds
    ctx.save()
    print(json.dumps(figures, indent=1, default=str), flush=True)


def item(ctx: Context, figures: dict, key: str, job: Callable[[], dict], cap: Cap) -> None:
    """One measurement of a section: its figures, or skipped, or its error; then save."""
    print(f"-- {key}", flush=True)
    started = time.perf_counter()
    try:
        cap.check()
        figures[key] = job()
    except Skip as reason:
        figures[key] = {"skipped": str(reason)}
    except ModuleNotFoundError as error:
        figures[key] = {"skipped": f"{error.name} is not installed"}
    except Exception as error:
        figures[key] = {"error": f"{type(error).__name__}: {error}"}
        traceback.print_exc()
    finally:
        release(ctx.device)
    if "skipped" not in figures[key]:
        figures[key]["seconds"] = round(time.perf_counter() - started, 1)
    ctx.save()


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def machine_info(device: torch.device) -> dict:
    """The host, its CPU and GPU, and the versions that matter here."""
    import cv2
    import torchvision

    info = machine(torchvision, np, cv2)
    info["host"] = platform.node()
    info["python"] = platform.python_version()
    info["cpu"] = cpu_model() or None
    info["cuda"] = torch.version.cuda
    info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    info["onnxruntime"] = onnxruntime_state()[1]
    from casm_deploy.data.dali import dali_available

    info["dali"] = dali_available()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {
            "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "capability": f"{props.major}.{props.minor}",
            "count": torch.cuda.device_count(),
        }
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            info["gpu"]["driver"] = subprocess.run(
                query, capture_output=True, text=True, timeout=20
            ).stdout.strip()
        info["tf32_defaults"] = tf32_state()
    return info


def onnxruntime_state() -> tuple[bool, str]:
    """(ONNX Runtime has a CUDA provider, what is installed in words)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False, "not installed"
    providers = ort.get_available_providers()
    words = f"{ort.__version__} ({', '.join(providers)})"
    return "CUDAExecutionProvider" in providers, words


def tf32_state() -> dict[str, Any]:
    """Whether CUDA fp32 convolutions and matmuls may use TF32 (torch's own words for it)."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    if hasattr(cudnn, "conv"):  # PyTorch >= 2.9: "tf32", "ieee", or "none" (the legacy flag)
        return {
            "convolutions": cudnn.conv.fp32_precision,
            "matmul": matmul.fp32_precision,
            "legacy_allow_tf32": {"cudnn": cudnn.allow_tf32, "matmul": matmul.allow_tf32},
        }
    return {"convolutions_allow_tf32": cudnn.allow_tf32, "matmul_allow_tf32": matmul.allow_tf32}


@contextlib.contextmanager
def counting_syncs(device: torch.device) -> Iterator[Counter | None]:
    """The host syncs inside, by the line that caused them (None off CUDA).

    CUDA's sync debug mode warns at every synchronising call (`.item()`, a copy to the host,
    `nonzero`, ...); the warnings are recorded, not shown. Nothing inside may call
    `torch.cuda.synchronize()` itself, which would count too.
    """
    if device.type != "cuda":
        yield None
        return
    where: Counter = Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield where
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for warning in caught:
        if "synchroniz" in str(warning.message):
            where[f"{Path(warning.filename).name}:{warning.lineno}"] += 1


def sync_figures(where: Counter | None, steps: int) -> dict:
    if where is None:
        return {"skipped": "CUDA's sync debug mode counts host syncs on CUDA only"}
    total = sum(where.values())
    return {
        "per_step": round(total / steps, 2),
        "total": total,
        "steps": steps,
        "where": dict(where),
    }


def timed(fn: Callable[[], Any], device: torch.device, sizes: Sizes) -> dict:
    """Images/s of `fn` (one batch of `extract_batch`): warm-ups, then about extract_seconds."""
    for _ in range(sizes.extract_warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    once = time.perf_counter() - start
    iterations = max(3, min(sizes.extract_iters, math.ceil(sizes.extract_seconds / once)))
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    synchronize(device)
    seconds = (time.perf_counter() - start) / iterations
    return {
        "images_per_second": round(sizes.extract_batch / seconds, 1),
        "ms_per_batch": round(1000 * seconds, 2),
        "iterations": iterations,
    }


# --- data -------------------------------------------------------------------------------------


def data_section(ctx: Context, cap: Cap, figures: dict) -> None:
    """ImageNet-sized JPEGs in the ImageNet layout (the embedded generator, in parallel)."""
    from casm_deploy.config import SynthConfig
    from casm_deploy.data.synth import generate

    s = ctx.sizes
    out = ctx.work / "synth"
    cfg = SynthConfig(
        out=str(out),
        num_classes=s.classes,
        train_per_class=s.train_per_class,
        val_per_class=s.val_per_class,
        min_side=s.min_side,
        max_side=s.max_side,
        workers=os.cpu_count() or 1,
    )
    generate(cfg, progress=False)
    files = sorted(out.rglob("*.JPEG"))
    figures.update(
        train_images=s.classes * s.train_per_class,
        val_images=s.classes * s.val_per_class,
        shorter_side=[s.min_side, s.max_side],
        megabytes=round(sum(f.stat().st_size for f in files) / 1e6, 1),
    )
    ctx.data = out


def need_data(ctx: Context) -> Path:
    if ctx.data is None:
        raise Skip("no data: the data section did not finish")
    return ctx.data


# --- training ---------------------------------------------------------------------------------


class Batches:
    """The loader as `casm_one_epoch` sees it: its first `steps` batches, each one's arrival time
    noted, made NCHW-contiguous for the contiguous layout (the loader's are channels-last)."""

    def __init__(self, loader: Any, steps: int, contiguous: bool = False):
        self.loader, self.steps, self.contiguous = loader, steps, contiguous
        self.arrivals: list[float] = []

    def __len__(self) -> int:
        return min(self.steps, len(self.loader))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[tuple]:
        for images, labels, indices in islice(self.loader, self.steps):
            self.arrivals.append(time.perf_counter())
            yield (images.contiguous() if self.contiguous else images), labels, indices


def train_loader(ctx: Context, batches: int, workers: int, loader: str = "torch") -> Any:
    """The training loader of the data's train split, cut to about `batches` batches."""
    from casm_deploy.data.imagenet import list_images, read_classes
    from casm_deploy.data.loader import build_loader

    s, data = ctx.sizes, need_data(ctx)
    wnids = read_classes(data).wnids
    n = len(list_images(data, "train", wnids))
    if n < batches * s.train_batch:
        raise Skip(f"{n} training images, fewer than {batches} batches of {s.train_batch}")
    return build_loader(
        data,
        "train",
        wnids,
        s.image_size,
        s.train_batch,
        train=True,
        workers=workers,
        loader=loader,
        device=str(ctx.device),
        fraction=min(1.0, (batches * s.train_batch + 0.5) / n),
    )


def count_calls(obj: Any, name: str, counts: Counter, key: Callable[[Any], str]) -> None:
    """Wrap `obj.name` so that each call adds one to `counts[key(result)]`."""
    original = getattr(obj, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        counts[key(result)] += 1
        return result

    setattr(obj, name, counted)


def train_config(ctx: Context, amp: str, channels_last: bool, tf32_is_off: bool) -> dict:
    """One configuration: casm.step alone, then the epoch loop, on one fresh CASM."""
    from casm_deploy.common.ui import progress
    from casm_deploy.deploy.export.parity import ieee_fp32
    from casm_deploy.models.mapping import build_masker
    from casm_deploy.training.casm import CASM, StepSettings
    from casm_deploy.training.train import casm_one_epoch

    s, device = ctx.sizes, ctx.device
    if amp == "fp16" and not ctx.cuda:
        raise Skip("fp16 AMP needs CUDA")
    if tf32_is_off and not ctx.cuda:
        raise Skip("TF32 is a CUDA setting")
    settings = StepSettings(amp=amp)  # train's defaults: preset L100
    layout = torch.channels_last if channels_last else torch.contiguous_format
    release(device)
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with ieee_fp32() if tf32_is_off else contextlib.nullcontext():
        torch.manual_seed(0)
        masker = build_masker(s.arch, 1000, s.width).to(device, memory_format=layout)
        casm = CASM(masker, settings, random.Random(0))
        draws: Counter = Counter()
        count_calls(casm.pool, "draw", draws, lambda i: "current" if i is None else "snapshot")
        updates: Counter = Counter()
        initial_scale = casm.scaler.get_scale() if casm.scaler.is_enabled() else None
        count_calls(casm.scaler, "update", updates, lambda _: "calls")

        # casm.step alone, on one batch already on the device.
        images = torch.rand(s.train_batch, 3, s.image_size, s.image_size, device=device)
        images = images.contiguous(memory_format=layout)
        labels = torch.randint(0, 1000, (s.train_batch,), device=device)
        for _ in range(s.warmup_steps):
            casm.step(images, labels)
        synchronize(device)
        with counting_syncs(device) as step_syncs:
            for _ in range(s.sync_steps):
                casm.step(images, labels)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(s.timed_steps):
            out = casm.step(images, labels)
        synchronize(device)
        step_seconds = (time.perf_counter() - start) / s.timed_steps
        losses = [float(out.loss_clean), float(out.loss_masked), float(out.loss_mapping)]

        # The real epoch loop: a first short epoch with the sync count (it also warms the
        # loader's path), then the timed epoch.
        loader = train_loader(ctx, s.epoch_steps, s.train_workers)
        with progress(disable=True) as bars:
            with counting_syncs(device) as loop_syncs:
                casm_one_epoch(casm, Batches(loader, s.sync_steps, not channels_last), bars, "")
            synchronize(device)
            draws.clear()
            batches = Batches(loader, s.epoch_steps, not channels_last)
            start = time.perf_counter()
            metrics = casm_one_epoch(casm, batches, bars, "")
            synchronize(device)
            end = time.perf_counter()
    steps = len(batches.arrivals)
    figures: dict[str, Any] = {
        "amp": amp,
        "layout": "channels-last" if channels_last else "contiguous",
        "tf32": tf32_state() if ctx.cuda and amp == "off" else None,
        "step_only": {
            "images_per_second": round(s.train_batch / step_seconds, 1),
            "ms_per_step": round(1000 * step_seconds, 2),
            "steps": s.timed_steps,
        },
        "epoch_loop": {
            "images_per_second": round(steps * s.train_batch / (end - start), 1),
            # from the first batch's arrival on: the loader's start-up left out
            "steady_images_per_second": round(
                steps * s.train_batch / max(end - batches.arrivals[0], 1e-9), 1
            )
            if steps
            else None,
            "first_batch_seconds": round(batches.arrivals[0] - start, 3) if steps else None,
            "steps": steps,
            "workers": s.train_workers,
        },
        "host_syncs": {
            "casm.step": sync_figures(step_syncs, s.sync_steps),
            "casm_epoch": sync_figures(loop_syncs, s.sync_steps),
        },
        "pool": {
            "pool_device": settings.pool_device,
            "storage": str(getattr(casm.pool, "storage", "cpu")),
            "snapshots": len(casm.pool.snapshots),
            "draws_in_timed_epoch": dict(draws),
        },
        "losses_finite": all(map(math.isfinite, losses))
        and all(math.isfinite(v) for v in metrics.values() if isinstance(v, float)),
    }
    figures["epoch_loop"]["over_step_only"] = round(
        figures["epoch_loop"]["images_per_second"] / figures["step_only"]["images_per_second"], 3
    )
    if ctx.cuda:
        figures["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if casm.scaler.is_enabled():
        final = casm.scaler.get_scale()
        # Each update that finds inf/NaN gradients halves the scale (and the optimiser steps
        # since the update before are skipped); growth needs growth_interval clean updates.
        grew = updates["calls"] >= casm.scaler.get_growth_interval()
        figures["fp16_scaler"] = {
            "initial_scale": initial_scale,
            "final_scale": final,
            "updates": updates["calls"],
            "skipped_updates": None if grew else round(math.log2(initial_scale / final)),
        }
    return figures


def training_section(ctx: Context, cap: Cap, figures: dict) -> None:
    s = ctx.sizes
    need_data(ctx)
    figures.update(
        arch=s.arch,
        width=s.width,
        image_size=s.image_size,
        batch=s.train_batch,
        preset="L100",
        classes=1000,
        steps={
            "warm-up": s.warmup_steps,
            "sync count": s.sync_steps,
            "step only": s.timed_steps,
            "epoch loop": s.epoch_steps,
        },
        cudnn_benchmark=ctx.cuda,  # as `casm-deploy train` sets it on CUDA
    )
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = ctx.cuda
    try:
        for name, (amp, channels_last, off) in TRAIN_CONFIGS.items():
            item(ctx, figures, name, partial(train_config, ctx, amp, channels_last, off), cap)
    finally:
        torch.backends.cudnn.benchmark = saved


def best_training(ctx: Context) -> tuple[str, dict] | None:
    """The training configuration with the fastest casm.step, if the training section ran."""
    runs = {
        name: f
        for name, f in ctx.results["sections"].get("training", {}).items()
        if isinstance(f, dict) and "step_only" in f
    }
    if not runs:
        return None
    name = max(runs, key=lambda n: runs[n]["step_only"]["images_per_second"])
    return name, runs[name]


# --- loader -----------------------------------------------------------------------------------


def loader_rate(ctx: Context, workers: int, kind: str) -> dict:
    s = ctx.sizes
    loader = Batches(train_loader(ctx, s.loader_batches, workers, kind), s.loader_batches)
    start = time.perf_counter()
    first = None
    for images, _, _ in loader:
        first = images if first is None else first
    synchronize(ctx.device)
    end = time.perf_counter()
    n = len(loader.arrivals)
    return {
        "images_per_second": round(n * s.train_batch / (end - start), 1),
        "steady_images_per_second": round(
            (n - 1) * s.train_batch / max(end - loader.arrivals[0], 1e-9), 1
        )
        if n > 1
        else None,
        "first_batch_seconds": round(loader.arrivals[0] - start, 3),
        "batches": n,
        "images": {
            "device": str(first.device),
            "dtype": str(first.dtype).removeprefix("torch."),
            "channels_last": first.is_contiguous(memory_format=torch.channels_last),
        },
    }


def loader_section(ctx: Context, cap: Cap, figures: dict) -> None:
    from casm_deploy.data.dali import dali_available

    s = ctx.sizes
    need_data(ctx)
    figures.update(image_size=s.image_size, batch=s.train_batch, resize="center-crop, train")
    for workers in s.loader_workers:
        job = partial(loader_rate, ctx, workers, "torch")
        item(ctx, figures, f"torch, {workers} workers", job, cap)
    for threads in sorted({max(w, 1) for w in s.loader_workers}):
        key = f"dali, {threads} threads"
        if not dali_available():
            figures[key] = {"skipped": "NVIDIA DALI is not installed (nvidia-dali-cuda120)"}
            continue
        item(ctx, figures, key, partial(loader_rate, ctx, threads, "dali"), cap)
    best = best_training(ctx)
    if best is None:
        figures["against training"] = {"skipped": "no training figures to compare with"}
        return
    name, run = best
    step = run["step_only"]["images_per_second"]
    figures["against training"] = {
        "fastest step": name,
        "step_only_images_per_second": step,
        "epoch_loop_images_per_second": run["epoch_loop"]["images_per_second"],
        "loader_over_step": {
            key: round(f["images_per_second"] / step, 3)
            for key, f in figures.items()
            if isinstance(f, dict) and "images_per_second" in f
        },
    }


# --- parity -----------------------------------------------------------------------------------


def plant(masker: Any, gain: float = 8.0, threshold: float = 0.6) -> Any:
    """Make the mapping's mask a smooth blob over the image's colourful pixels, in place.

    Stem channels 0-5 become relu(c1 - c2) for the six ordered pairs of RGB channels (of the
    image in [0, 1]: the weights undo the normalisation), averaged over the 7 x 7 window; their
    sum is twice the chroma, max - min. The mask head reads only those channels: a 3 x 3 mean,
    then sigmoid(gain * (2 chroma - threshold)). The embedded data's objects are saturated and
    their backgrounds muted, so the mask is a blob on the object, near 0 on the background,
    smooth at the stem's resolution, and its boxes do not hang on a few pixels near the
    binarising threshold (a random ResNet's mask is speckle, whose boxes move with any
    rounding). With gain 4 and threshold 0.5 the background sat near the threshold: bf16 moved
    1 box of 130 (CPU, ResNet-50 at 224 px); with 8 and 0.6, none, max |dmask| 0.007 (the
    criteria: 97 % of boxes, 0.02). The encoder's other weights stay random: the logits cost
    what a trained model's do.
    """
    from casm_deploy.models.mapping import IMAGENET_MEAN, IMAGENET_STD

    encoder, decoder = masker.encoder, masker.decoder
    pairs = [(0, 1), (1, 0), (1, 2), (2, 1), (0, 2), (2, 0)]
    window = encoder.conv1.kernel_size[0] * encoder.conv1.kernel_size[1]
    with torch.no_grad():
        for channel, (a, b) in enumerate(pairs):
            encoder.conv1.weight[channel] = 0
            encoder.conv1.weight[channel, a] = IMAGENET_STD[a] / window
            encoder.conv1.weight[channel, b] = -IMAGENET_STD[b] / window
            bn = encoder.bn1
            bn.running_mean[channel], bn.running_var[channel] = 0.0, 1.0
            bn.weight[channel], bn.bias[channel] = 1.0, IMAGENET_MEAN[a] - IMAGENET_MEAN[b]
        decoder.final.weight.zero_()
        decoder.final.weight[0, : len(pairs)] = gain / 9
        decoder.final.bias.fill_(-gain * threshold)
    return masker


def planted_checkpoint(ctx: Context) -> Path:
    """A checkpoint of the real schema holding the planted mapping (made once)."""
    if ctx.planted is not None:
        return ctx.planted
    from casm_deploy.checkpoint import (
        load_checkpoint,
        masker_from_checkpoint,
        save_atomic,
        save_untrained,
    )
    from casm_deploy.data.imagenet import read_classes

    s, data = ctx.sizes, need_data(ctx)
    info = read_classes(data)
    path = ctx.work / "planted.pt"
    save_untrained(
        path, info.wnids, info.names, arch=s.arch, width=s.width, image_size=s.image_size,
        config={"data": str(data), "planted": "gpu_check.plant"},
    )  # fmt: skip
    checkpoint = load_checkpoint(path)
    masker = plant(masker_from_checkpoint(checkpoint))
    checkpoint["encoder"] = masker.encoder.state_dict()
    checkpoint["decoder"] = masker.decoder.state_dict()
    save_atomic(checkpoint, path)
    ctx.planted = path
    return path


def exported(ctx: Context, precision: str) -> dict:
    """`casm-deploy export` of the planted mapping at `precision` on the device (made once):
    TorchScript, and ONNX fp32 where ONNX Runtime can run it here."""
    if precision in ctx.exports:
        return ctx.exports[precision]
    from casm_deploy.config import ExportConfig
    from casm_deploy.deploy.export import job as export

    onnx = precision == "fp32" and (onnxruntime_state()[0] or not ctx.cuda)
    cfg = ExportConfig(
        checkpoint=str(planted_checkpoint(ctx)),
        out=str(ctx.work / f"export-{precision}"),
        onnx=onnx,
        precision=precision,
        device=ctx.device.type,
        data=str(need_data(ctx)),
        parity_random=ctx.sizes.parity_random,
    )
    result = export.run(cfg)
    ctx.exports[precision] = result
    return result


def planted_masks(ctx: Context) -> dict:
    """What the planted mapping's masks look like on 16 validation images: area and boxes."""
    from casm_deploy.data.imagenet import list_images, read_annotation, read_classes
    from casm_deploy.deploy.runtime.masker import Masker
    from casm_deploy.evaluation.metrics import box_iou

    data = need_data(ctx)
    info = read_classes(data)
    samples = list_images(data, "val", info.wnids)
    picks = np.unique(np.linspace(0, len(samples) - 1, num=16).round().astype(int))
    samples = [samples[i] for i in picks]  # spread over the classes
    masker = Masker.load(planted_checkpoint(ctx), device=ctx.device.type)
    result = masker.predict([str(p) for p, _ in samples], mask_size="model")
    hits, areas = [], []
    for (path, label), box in zip(samples, result.boxes, strict=True):
        truth = read_annotation(data / "annotations" / f"{path.stem}.xml")
        hits.append(max(box_iou(box, b) for b in truth.boxes_of(info.wnids[label])) > 0.5)
        width, height = truth.width, truth.height
        areas.append(0 if box is None else (box[2] - box[0]) * (box[3] - box[1]) / width / height)
    return {
        "images": len(samples),
        "mask_mean": round(float(np.mean([m.mean() for m in result.masks])), 3),
        "box_area_share": round(float(np.mean(areas)), 3),
        "box_iou_above_0.5_with_the_object": round(float(np.mean(hits)), 3),
    }


def parity_figures(ctx: Context, precision: str) -> dict:
    report = exported(ctx, precision)["parity"]
    files = {}
    for r in report["results"]:
        worst = r.get("worst") or {}
        files[r["file"]] = {
            "status": r["status"],
            "backend": r.get("backend"),
            **{k: worst[k] for k in ("max_abs_mask", "mean_abs_mask") if k in worst},
            **{k: worst[k] for k in ("boxes_iou_above_0.9", "argmax_agree") if k in worst},
            **({"failures": r["failures"]} if r.get("failures") else {}),
        }
    return {"verdict": report["verdict"], "reference": report["reference"], "files": files}


def parity_section(ctx: Context, cap: Cap, figures: dict) -> None:
    s = ctx.sizes
    figures.update(
        mapping=f"planted {s.arch} (width {s.width}) at {s.image_size} px: see gpu_check.plant",
        device=ctx.device.type,
    )
    cuda_ort, words = onnxruntime_state()
    if ctx.cuda and not cuda_ort:
        figures["onnx"] = {"skipped": f"ONNX Runtime has no CUDA provider here: {words}"}
    item(ctx, figures, "planted masks", lambda: planted_masks(ctx), cap)
    for precision in ("fp32", "fp16", "bf16"):
        item(ctx, figures, precision, partial(parity_figures, ctx, precision), cap)


# --- extraction -------------------------------------------------------------------------------


class Autocast(torch.nn.Module):
    """A module run under autocast to `dtype` (eager AMP inference)."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, images: torch.Tensor) -> Any:
        with torch.autocast(images.device.type, dtype=self.dtype):
            return self.module(images)


def onnx_model_only(backend: Any, images: np.ndarray, device: torch.device) -> Callable:
    """ONNX Runtime on an input already where it runs (CUDA: IO binding to torch tensors)."""
    session = backend.session
    inputs = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / 255
    if device.type == "cpu":
        return lambda: session.run(["masks", "logits"], {"images": inputs})
    batch, size, classes = len(images), backend.info.image_size, backend.info.num_classes
    tensors = {
        "images": torch.from_numpy(inputs).to(device),
        "masks": torch.empty((batch, 1, size, size), device=device),
        "logits": torch.empty((batch, classes), device=device),
    }
    binding = session.io_binding()
    for name, tensor in tensors.items():
        bind = binding.bind_input if name == "images" else binding.bind_output
        bind(name, "cuda", device.index or 0, np.float32, tuple(tensor.shape), tensor.data_ptr())
    torch.cuda.synchronize()
    return lambda: session.run_with_iobinding(binding)


def host_copies(module: torch.nn.Module, device: torch.device) -> Callable:
    """`Masker.run` for a module of our own: uint8 (B, S, S, 3) host images in, as infer's
    torch backends take them, masks (B, S, S) and logits back on the host."""

    @torch.inference_mode()
    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        inputs = torch.from_numpy(images).to(device, non_blocking=True)
        masks, logits = module(inputs.permute(0, 3, 1, 2).float().div_(255))
        return masks[:, 0].float().cpu().numpy(), logits.float().cpu().numpy()

    return run


def extraction_variant(ctx: Context, kind: str, precision: str, images: np.ndarray) -> dict:
    """One backend at one precision: model only, and with the host copies (`Masker.run`, the
    path infer takes; eager AMP, which no backend offers, through `host_copies`)."""
    from casm_deploy.artifact import load_torchscript
    from casm_deploy.checkpoint import load_masker
    from casm_deploy.deploy.runtime.masker import Masker

    device = ctx.device
    if kind == "onnx":
        cuda_ort, words = onnxruntime_state()
        if ctx.cuda and not cuda_ort:
            raise Skip(f"ONNX Runtime has no CUDA provider here: {words}")
    if kind == "eager":
        path = planted_checkpoint(ctx)
    else:
        files = exported(ctx, precision)["files"]
        name = "onnx" if kind == "onnx" else "torchscript"
        if name not in files:
            raise Skip(f"no {name} file was exported at {precision}")
        path = ctx.work / f"export-{precision}" / files[name]["file"]
    masker = Masker.load(path, device=device.type)
    with_copies = masker.run
    if kind == "onnx":
        model_only = onnx_model_only(masker.backend, images, device)
    else:
        if kind == "eager":  # as infer's eager backend runs it
            module = load_masker(path)[0].to(device, memory_format=torch.channels_last)
        else:
            module = load_torchscript(path, device)
        if kind == "eager" and precision != "fp32":
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            module = Autocast(module, dtype)
            with_copies = host_copies(module, device)
        x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div_(255)

        def model_only() -> Any:
            with torch.inference_mode():
                return module(x)

    figures = {
        "provider": masker.info.provider,
        "file_precision": masker.info.precision,
        "model_only": timed(model_only, device, ctx.sizes),
        "with_copies": timed(lambda: with_copies(images), device, ctx.sizes),
    }
    if kind == "eager" and precision != "fp32":
        figures["with_copies_through"] = "gpu_check.host_copies (no backend runs eager AMP)"
    if kind == "eager" and precision == "fp32" and ctx.cuda:
        figures["tf32"] = tf32_state()
    return figures


EXTRACTION_VARIANTS = {
    "eager fp32": ("eager", "fp32"),
    "eager bf16 AMP": ("eager", "bf16"),
    "eager fp16 AMP": ("eager", "fp16"),
    "torchscript fp16": ("torchscript", "fp16"),
    "torchscript bf16": ("torchscript", "bf16"),
    "torchscript fp32": ("torchscript", "fp32"),
    "onnxruntime fp32": ("onnx", "fp32"),
}


def extraction_section(ctx: Context, cap: Cap, figures: dict) -> None:
    s = ctx.sizes
    figures.update(
        mapping=f"the planted {s.arch} (width {s.width}), {s.classes} classes",
        batch=s.extract_batch,
        image_size=s.image_size,
        warmups=s.extract_warmup,
        cudnn_benchmark=torch.backends.cudnn.benchmark,
        input="random uint8 (B, S, S, 3) on the host; model only: float (B, 3, S, S) "
        "channels-last on the device",
    )
    rng = np.random.default_rng(0)
    size = (s.extract_batch, s.image_size, s.image_size, 3)
    images = rng.integers(0, 256, size, dtype=np.uint8)
    for name, (kind, precision) in EXTRACTION_VARIANTS.items():
        item(ctx, figures, name, partial(extraction_variant, ctx, kind, precision, images), cap)


# --- infer ------------------------------------------------------------------------------------


def infer_run(ctx: Context, model: Path, masks: str, decoder: str, name: str) -> dict:
    from casm_deploy.common.ui import console
    from casm_deploy.config import InferConfig
    from casm_deploy.deploy.infer import job as infer

    folder = need_data(ctx) / "train"
    try:
        cfg = InferConfig(
            dir=str(folder),
            model=str(model),
            out=str(ctx.work / f"infer-{name}"),
            batch=ctx.sizes.infer_batch,
            device=ctx.device.type,
            decoder=decoder,
            masks=masks,
            overwrite=True,
        )
    except ValueError as error:  # a decoder this casm-deploy does not know
        raise Skip(str(error)) from None
    with console.capture() as captured:
        summary = infer.run(cfg)
    said = [line.strip() for line in captured.get().splitlines() if line.startswith("decoding")]
    return {
        "masks": masks,
        "decoder": decoder,
        "decoding": said[0] if said else None,
        "files": summary["files"],
        "ok": summary["ok"],
        "images_per_second": summary["images_per_second"],
        "seconds": summary["this_run"]["seconds"],
        "provider": summary["provider"],
        "precision": summary["precision"],
        "batch": cfg.batch,
        "threads": os.cpu_count(),
    }


def infer_section(ctx: Context, cap: Cap, figures: dict) -> None:
    precision = "fp16" if ctx.cuda else "fp32"
    files = exported(ctx, precision)["files"]
    model = ctx.work / f"export-{precision}" / files["torchscript"]["file"]
    s = ctx.sizes
    figures.update(
        model=f"TorchScript {precision} of the planted {s.arch} at {s.image_size} px",
        folder=f"the data's train split: {s.classes * s.train_per_class} JPEGs",
        note="each run loads the model and pays TorchScript's first-run optimisation",
    )
    runs = {
        "masks none": ("none", "auto"),
        "masks png": ("png", "auto"),
        "masks none, torchvision": ("none", "torchvision"),
        "masks none, opencv": ("none", "opencv"),
    }
    for index, (key, (masks, decoder)) in enumerate(runs.items()):
        item(ctx, figures, key, partial(infer_run, ctx, model, masks, decoder, str(index)), cap)


# --- gpu tests --------------------------------------------------------------------------------


def junit_outcomes(path: Path) -> dict[str, str]:
    """{test id: passed, or failed / error / skipped with the first line of the reason}."""
    outcomes = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                word = "failed" if child.tag == "failure" else child.tag
                message = (child.get("message") or "").strip().splitlines()
                outcome = f"{word}: {message[0][:300]}" if message else word
                break
        outcomes[f"{case.get('classname')}::{case.get('name')}"] = outcome
    return outcomes


def gpu_tests_section(ctx: Context, cap: Cap, figures: dict) -> None:
    if ctx.args.skip_tests:
        raise Skip("--skip-tests")
    junit = ctx.work / "gpu-tests.xml"
    run = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    run += [f"--junitxml={junit}", "-o", "addopts="]
    timeout = max(10.0, cap.left())
    try:
        done = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        tail = expired.stdout if isinstance(expired.stdout, str) else ""
        figures.update(timed_out=f"pytest ran past {timeout:.0f} s", output_tail=tail[-2000:])
        return
    lines = done.stdout.strip().splitlines()
    tests = junit_outcomes(junit) if junit.is_file() else {}
    figures.update(
        returncode=done.returncode,
        summary=lines[-1] if lines else done.stderr[-500:],
        counts=dict(Counter(outcome.split(":")[0] for outcome in tests.values())),
        tests=tests,
    )


# --- main -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    parser.add_argument("--small", action="store_true", help="toy sizes (a CPU dry run)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--budget", type=float, default=440.0, help="seconds for all sections")
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()

    name = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: PyTorch finds no CUDA device here")
    if name == "cpu" and not args.small:
        sys.exit("no CUDA device: nothing to check (use --small for a CPU dry run)")
    device = torch.device(name)
    sizes = SMALL if args.small else Sizes()
    started = time.monotonic()
    results: dict = {
        "benchmark": "gpu_check",
        "command": command("gpu_check.py", args),
        "small": args.small,
        "device": name,
        "machine": machine_info(device),
        "sizes": {k: v for k, v in asdict(sizes).items() if k != "caps"},
        "caps_seconds": sizes.caps,
        "sections": {},
    }
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        ctx = Context(args, sizes, device, Path(tmp), started + args.budget, results)
        ctx.save()
        jobs = {
            "data": data_section,
            "training": training_section,
            "loader": loader_section,
            "parity": parity_section,
            "extraction": extraction_section,
            "infer": infer_section,
            "gpu tests": gpu_tests_section,
        }
        assert tuple(jobs) == SECTIONS
        for section_name, job in jobs.items():
            section(ctx, section_name, job)
    results["seconds"] = round(time.monotonic() - started, 1)
    ctx.save()


if __name__ == "__main__":
    main()
