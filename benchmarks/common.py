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
    """The command line that reproduces the run, every option spelled out (`--out` left out).

    A switch (a boolean option) is spelled `--flag` when on and left out when off.
    """
    options = []
    for key, value in vars(args).items():
        flag = f"--{key.replace('_', '-')}"
        if key == "out" or value is False:
            continue
        options.append(flag if value is True else f"{flag} {value}")
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
    """Write `result` through a temporary file and a rename: a kill leaves the old or the new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")


def linked(entries: list, folder: Path) -> Path:
    """A folder of links to exactly these files (infer reads a folder)."""
    for entry in entries:
        link = folder / entry.rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(entry.path.resolve())
    return folder
