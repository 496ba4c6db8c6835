"""benchmarks/gpu_check.py --small: every section of the GPU machine's script runs on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
SECTIONS = ["data", "training", "loader", "parity", "extraction", "infer", "gpu tests"]


def errors(value, where=""):
    """Every `error` (and `incomplete`) key anywhere in the results, with where it is."""
    if isinstance(value, dict):
        for key, inner in value.items():
            if key in ("error", "incomplete"):
                yield f"{where}: {inner}"
            yield from errors(inner, f"{where}/{key}")


@pytest.mark.slow
def test_small_run_fills_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    run = [sys.executable, str(SCRIPT), "--small", "--device", "cpu", "--out", str(out)]
    done = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert list(result["sections"]) == SECTIONS
    assert not list(errors(result)), list(errors(result))
    for name, figures in result["sections"].items():
        assert "seconds" in figures, name
        figures = {k: v for k, v in figures.items() if k not in ("seconds", "cap_seconds")}
        assert figures.get("skipped") or figures, name  # a reason, or figures
    assert result["command"].startswith("python benchmarks/gpu_check.py --small")
    assert {"cpu_count", "torch", "host"} <= set(result["machine"])

    sections = result["sections"]
    fp32 = sections["training"]["fp32 channels-last"]
    if "skipped" not in fp32:  # a cap can skip it on a loaded machine
        assert fp32["step_only"]["images_per_second"] > 0
        assert fp32["epoch_loop"]["steps"] == result["sizes"]["epoch_steps"]
        assert fp32["losses_finite"]
    assert sections["training"]["fp16 channels-last"]["skipped"] == "fp16 AMP needs CUDA"
    if "skipped" not in sections["parity"]["fp32"]:
        assert sections["parity"]["fp32"]["verdict"] == "passed"
    tests = sections["gpu tests"]["tests"]
    assert tests
    if not torch.cuda.is_available():
        assert all(outcome.startswith("skipped") for outcome in tests.values())
