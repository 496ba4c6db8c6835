"""What the benchmark scripts record beside their figures: the command, the machine, the file.

Imported as a sibling module (`python benchmarks/<script>.py` puts this folder on the path).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from types import ModuleType

import torch


def command(script: str, args: argparse.Namespace) -> str:
    """The command line that reproduces the run, every option spelled out (`--out` left out)."""
    options = (f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out")
    return " ".join([f"python benchmarks/{script}", *options])


def machine(*libraries: ModuleType) -> dict:
    """The CPU, the platform and the versions of torch and of `libraries` (e.g. onnxruntime)."""
    return {
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        **{library.__name__: library.__version__ for library in libraries},
        "torch_threads": torch.get_num_threads(),
    }


def write_json(path: str | Path, result: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
