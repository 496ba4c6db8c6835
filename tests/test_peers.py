"""benchmarks/peers.py --quick: every method, runtime and batch is recorded, with the ratios'
targets, in the JSON report.py renders (its figures' sizes are never checked)."""

from __future__ import annotations

import importlib.util
import json
import numbers
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RATIOS = {
    "mapping_vs_pytorch_grad_cam_eager": 20,
    "mapping_ort_vs_pytorch_grad_cam_eager": 30,
    "casm_shared_vs_pytorch_grad_cam_eager": 2,
    "infer_mapping_vs_gradcam_loop": 10,
    "infer_resnet50_vs_model_only": 0.9,
}
RUNTIMES = {
    "pytorch-grad-cam": {"eager"},
    "captum": {"eager"},
    "gradcam": {"eager"},
    "casm-shared": {"eager", "torchscript", "ort-fp32", "ort-int8"},
    "mapping": {"eager", "ort-fp32", "ort-int8"},
}
END_TO_END = (
    "infer_images_per_s",
    "gradcam_loop_images_per_s",
    "infer_resnet50_png_images_per_s",
    "model_only_resnet50_images_per_s",
)


def load_report():
    spec = importlib.util.spec_from_file_location("bench_report", BENCH / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@pytest.mark.slow
def test_quick_run_records_every_method_runtime_and_batch(tmp_path):
    out = tmp_path / "results" / "peers.json"
    run = [sys.executable, str(BENCH / "peers.py"), "--quick", "--mappings", "resnet18:16"]
    done = subprocess.run(
        [*run, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert (out.parent / result["plot"]).is_file()
    assert result["command"].startswith("python benchmarks/peers.py")
    assert "--quick" in result["command"]
    assert {"cpu_model", "avx512f", "avx512_bf16", "amx_bf16", "torch"} <= set(result["machine"])
    batch = result["settings"]["batch"]

    captum = importlib.util.find_spec("captum") is not None
    kinds = set(RUNTIMES) - (set() if captum else {"captum"})
    assert {row["kind"] for row in result["rows"]} == kinds
    if not captum:
        assert [s["method"] for s in result["skipped"]] == ["Captum LayerGradCam"]
    runtimes, batches = {}, {}
    for row in result["rows"]:
        assert {"method", "kind", "runtime", "batch", "ms_per_image", "peak_rss_mb"} <= set(row)
        assert row["runtime"] in RUNTIMES[row["kind"]]
        runtimes.setdefault(row["kind"], set()).add(row["runtime"])
        batches.setdefault((row["method"], row["runtime"]), set()).add(row["batch"])
        if row.get("error") is None:
            assert is_number(row["ms_per_image"]) and is_number(row["peak_rss_mb"]), row
    assert runtimes == {kind: RUNTIMES[kind] for kind in kinds}
    assert all(found == {1, batch} for found in batches.values()), batches

    end_to_end = result["end_to_end"]
    assert all(is_number(end_to_end[key]) for key in END_TO_END), end_to_end
    assert end_to_end["small_mapping"] == "mapping resnet18-w16"
    assert set(result["ratios"]) == set(RATIOS)
    for name, ratio in result["ratios"].items():
        assert ratio["target"] == RATIOS[name]
        assert is_number(ratio["value"]), (name, ratio)
        assert ratio["met"] == (ratio["value"] >= ratio["target"])

    rendered = load_report().peers(result)
    assert "| method | runtime |" in rendered
    assert "mapping resnet18-w16" in rendered and "target 20x" in rendered
