"""CASM training-step throughput on this machine: each preset, channels-last on and off.

Usage: python benchmarks/train_step.py [--arch resnet18] [--width 32] [--size 64] [--batch 64]
       [--amp off|bf16] [--presets F,L,...]
Prints a table and writes benchmarks/results/train_step.json. Random images: this measures the
model and the optimiser steps, not the data loader.
"""

from __future__ import annotations

import argparse
import platform
import random
import time
from pathlib import Path

import torch
from common import write_json

from casm_deploy.config import PRESETS
from casm_deploy.models.mapping import build_masker
from casm_deploy.training.casm import CASM, StepSettings


def measure(preset: str, channels_last: bool, args: argparse.Namespace) -> float:
    torch.manual_seed(0)
    masker = build_masker(args.arch, 10, args.width)
    images = torch.rand(args.batch, 3, args.size, args.size)
    if channels_last:
        masker = masker.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (args.batch,))
    p = PRESETS[preset]  # with a snapshot every 5 steps
    settings = StepSettings(fixed_classifier=p.fixed_classifier, hp=p.hp, smf=5, amp=args.amp)
    casm = CASM(masker, settings, random.Random(0))
    for _ in range(args.warmup):
        casm.step(images, labels)
    start = time.perf_counter()
    for _ in range(args.steps):
        casm.step(images, labels)
    return args.batch * args.steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--amp", default="off", help="off or bf16 (fp16 needs CUDA)")
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--out", default="", help="default: results/train_step[_AMP].json")
    args = parser.parse_args()
    suffix = "" if args.amp == "off" else f"_{args.amp}"
    args.out = args.out or str(Path(__file__).parent / "results" / f"train_step{suffix}.json")

    rows = []
    print(f"{'preset':<8}{'layout':<16}{'images/s':>10}")
    for preset in args.presets.split(","):
        for channels_last in (True, False):
            rate = measure(preset, channels_last, args)
            layout = "channels-last" if channels_last else "contiguous"
            rows.append({"preset": preset, "layout": layout, "images_per_second": rate})
            print(f"{preset:<8}{layout:<16}{rate:>10.0f}")
    result = {
        "benchmark": "train_step",
        "settings": vars(args),
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cores": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "rows": rows,
    }
    write_json(args.out, result)


if __name__ == "__main__":
    main()
