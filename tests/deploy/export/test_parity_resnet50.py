"""Issue 31: fp32 parity of a deep network, whose masks float32 rounding alone moves by ~1e-4.

A ResNet-50 (width 64) at 224 px takes one CASM step at the default lr from a fresh init
(`train`, as issue 31's user ran it from torchvision's weights), is exported to TorchScript and
ONNX, and checked on six images (parity_images: 4 real, 2 random; the command's 64 + 16 would
take minutes here). Its correct files pass at the bar eager fp32's own error from float64 sets,
and wrong ones still fail. `pytest -s` prints the figures.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from casm_deploy.checkpoint import load_masker
from casm_deploy.cli import app
from casm_deploy.config import SynthConfig
from casm_deploy.deploy.export import parity
from casm_deploy.deploy.export.exporters import export_masker
from casm_deploy.deploy.runtime.torch_backend import run_module

pytestmark = pytest.mark.slow

SIZE = 224


def _train(root: Path) -> tuple[Path, Path]:
    """2 classes of 4 training and 2 val images; one CASM step of a batch of 4 (lr 1e-2)."""
    from casm_deploy.data.synth import generate

    data = root / "data"
    sides = {"min_side": SIZE, "max_side": SIZE + 16}
    counts = {"num_classes": 2, "train_per_class": 4, "val_per_class": 2}
    generate(SynthConfig(out=str(data), **counts, **sides, workers=1), progress=False)
    args = ["train", str(data), "--arch", "resnet50", "--width", "64", "--image-size", str(SIZE)]
    args += ["--reproduce", "L100", "--pretrain-epochs", "0", "--epochs", "1"]
    args += ["--batch-size", "4", "--epoch-fraction", "0.5", "--seed", "0", "--workers", "0"]
    args += ["--device", "cpu", "--out", str(root / "runs"), "--name", "r50"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return root / "runs" / "r50" / "checkpoint.pt", data


def test_a_resnet50s_correct_export_passes_at_the_bar_float32_sets(tmp_path):
    checkpoint, data = _train(tmp_path)
    files = export_masker(checkpoint, tmp_path / "export", ("torchscript", "onnx"))
    written = {fmt: {"path": path, "precision": "fp32"} for fmt, path in files.items()}
    masker, _ = load_masker(checkpoint)
    masker.eval()
    wnids = sorted(p.name for p in (data / "train").iterdir())
    images, source = parity.parity_images(data, wnids, SIZE, real=4, random=2, seed=0)
    cpu = torch.device("cpu")

    report = parity.check_parity(masker, written, images, source, cpu)

    error = report["fp32_error"]  # eager fp32 against its float64 copy, on these six images
    own, bar = error["max_abs_mask"], error["max_abs_mask_bar"]
    results = {r["format"]: r for r in report["results"]}
    print(
        f"\nResNet-50 at {SIZE} px: eager fp32 from float64 {own:.3g} (mean "
        f"{error['mean_abs_mask']:.3g}), bar {bar:.3g}; "
        + ", ".join(
            f"{fmt} from eager {r['worst']['max_abs_mask']:.3g}" for fmt, r in results.items()
        )
    )
    assert report["passed"], [r.get("failures") for r in report["results"]]
    assert own > 0 and bar == parity.mask_bar(parity.THRESHOLDS["fp32"], own) >= max(1e-4, own)
    for result in results.values():
        assert result["status"] == "passed" and result["max_abs_mask_bar"] == bar
        worst = result["worst"]
        assert worst["max_abs_mask"] <= bar
        assert worst["boxes_identical"] == 1.0 and worst["argmax_agree"] == 1.0

    # Wrong files still fail at this bar, by far. Measured on this model: BatchNorm folded with
    # eps 1e-4 for 1e-5 moves masks by ~1e-2, fp16-rounded weights by ~5e-2, with every box and
    # argmax as eager's. (A 1 % change of the mask head's largest weight moves them by ~2e-4,
    # 6 x eager's own error and under the bar, its mean |Δmask| no larger than rounding's: on
    # this model none of these figures tells it from float32 rounding.)
    ref = parity.reference(lambda batch: run_module(masker, cpu, batch), images, source["real"])

    def wrong_eps(model: nn.Module) -> None:
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eps = 1e-4

    def fp16_weights(model: nn.Module) -> None:
        for weight in model.parameters():
            weight.copy_(weight.half().float())

    for name, spoil in {"BatchNorm eps": wrong_eps, "fp16 weights": fp16_weights}.items():
        wrong = copy.deepcopy(masker)
        with torch.no_grad():
            spoil(wrong)
        outputs = parity.run_batched(lambda b, m=wrong: run_module(m, cpu, b), images, 8)
        stats = parity.compare(ref, *outputs)
        print(f"{name}: max |Δmask| {stats['max_abs_mask']:.3g}")
        failures = parity.verdict(stats, parity.THRESHOLDS["fp32"], own)
        assert failures and failures[0].startswith("max |Δmask|"), (name, stats)
        assert stats["max_abs_mask"] > 10 * bar, (name, stats)
