"""The paper's configuration end to end on the CPU: a torchvision ResNet-50 at 224 px.

synth (ImageNet-like image sizes) -> train from a torchvision state dict -> export fp32
TorchScript + ONNX and int8 ONNX, with parity -> infer with the ONNX file. Every step runs the
CLI in a subprocess, so its wall time, CPU time and peak RSS are its own; `pytest -s` (or -rA)
shows the table. The pipeline runs once per module; each test checks one step's results.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from casm_deploy.deploy.export import parity

pytestmark = pytest.mark.slow

SIZE = 224
CLASSES = 2
TRAIN_PER_CLASS, VAL_PER_CLASS = 32, 4  # 72 images: parity needs 64 real ones (val + train)
BATCH, FRACTION = 4, 0.2  # int(64 * 0.2) = 12 images: 3 CASM steps
CALIBRATION_IMAGES = 16  # one calibration batch: enough to exercise int8, cheap at 224 px
MAX_RSS_GIB = 12.0
STEP_TIMEOUT_S = 600


@dataclasses.dataclass
class Step:
    name: str
    returncode: int
    seconds: float
    cpu_seconds: float
    peak_rss_gib: float  # the largest single process (the CLI or a data-loading worker)
    log: Path

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def run_cli(root: Path, name: str, *args: str, ok: tuple[int, ...] = (0,)) -> Step:
    """`python -m casm_deploy ARGS` in `root`; its own rusage through wait4, killed on timeout."""
    log = root / f"{name}.log"
    env = {**os.environ, "COLUMNS": "120"}
    started = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "casm_deploy", *args],
            cwd=root,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
        timer = threading.Timer(STEP_TIMEOUT_S, process.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            timer.cancel()
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    step = Step(
        name,
        process.returncode,
        time.perf_counter() - started,
        usage.ru_utime + usage.ru_stime,
        usage.ru_maxrss / 2**20,  # KiB on Linux
        log,
    )
    if step.returncode not in ok:
        pytest.fail(f"{name}: exit {step.returncode} after {step.seconds:.0f} s\n{step.tail()}")
    return step


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    import torchvision

    root = tmp_path_factory.mktemp("paper")
    data, weights = root / "data", root / "resnet50.pth"
    steps: dict[str, Step] = {}
    steps["synth"] = run_cli(
        root,
        "synth",
        *("data", "synth", str(data), "--num-classes", str(CLASSES)),
        *("--train-per-class", str(TRAIN_PER_CLASS), "--val-per-class", str(VAL_PER_CLASS)),
        *("--min-side", "375", "--max-side", "500"),  # ImageNet's shorter sides: ~333-500 px
    )

    # Random weights in torchvision's own file format (its 1000-class head included).
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50().state_dict(), weights)

    # --lr 1e-3 is the reference's classifier LR for a ResNet-50 (the default 1e-2 suits the
    # small from-scratch models). At 1e-2 three SGD steps move the weights further than the
    # BatchNorm running statistics (27 % updated) follow: in eval mode the features grow to
    # ~20 (max ~360), the mask logits to ~1e2-1e3, and the few pixels near the sigmoid's middle
    # move by 6e-4 with float32 summation order (fp32 parity's bar follows float32's own error
    # for the model since issue 31, so that passes too: tests/deploy/export/
    # test_parity_resnet50.py). At 1e-3 the features stay ~0.3 and parity holds at ~3e-5.
    # Seed 0's pool RNG draws the snapshot stored at step 0 on the third step (hp 0.5).
    steps["train"] = run_cli(
        root,
        "train",
        *("train", str(data), "--arch", "resnet50", "--width", "64"),
        *("--image-size", str(SIZE), "--weights", str(weights), "--reproduce", "L100"),
        *("--batch-size", str(BATCH), "--pretrain-epochs", "0", "--epochs", "1"),
        *("--epoch-fraction", str(FRACTION), "--lr", "1e-3", "--seed", "0"),
        *("--workers", "1", "--device", "cpu", "--out", str(root / "runs"), "--name", "r50"),
    )
    checkpoint = root / "runs" / "r50" / "checkpoint.pt"

    # fp32: the parity data is found from the checkpoint's config (the training data).
    steps["export fp32"] = run_cli(
        root,
        "export-fp32",
        *("export", str(checkpoint), "--onnx", "--out", str(root / "fp32")),
        ok=(0, 3),  # 3: parity failed; the test below says how
    )
    steps["export int8"] = run_cli(
        root,
        "export-int8",
        *("export", str(checkpoint), "--precision", "int8", "--no-torchscript"),
        *("--data", str(data), "--calibration-images", str(CALIBRATION_IMAGES)),
        *("--out", str(root / "int8")),
        ok=(0, 3),
    )
    steps["infer"] = run_cli(
        root,
        "infer",
        *("infer", str(data / "val"), "--model", str(root / "fp32" / "masker.onnx")),
        *("--out", str(root / "infer"), "--device", "cpu"),
    )
    return {"root": root, "data": data, "weights": weights, "checkpoint": checkpoint, **steps}


def _report(folder: Path) -> dict:
    return json.loads((folder / "export.json").read_text())


def _onnx_shapes(path: Path) -> dict[str, list]:
    """Input and output shapes as the graph declares them (a symbolic dim: its name)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return {
        value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        for value in [*graph.input, *graph.output]
    }


def _wnids(data: Path) -> list[str]:
    return sorted(p.name for p in (data / "train").iterdir())


def test_training_starts_from_the_torchvision_weights(pipeline):
    checkpoint = torch.load(pipeline["checkpoint"], map_location="cpu", weights_only=True)
    spec = checkpoint["model"]
    assert (spec["arch"], spec["width"], spec["image_size"]) == ("resnet50", 64, SIZE)
    assert spec["num_classes"] == CLASSES and spec["wnids"] == _wnids(pipeline["data"])
    assert checkpoint["step"] == 3 and checkpoint["phase"] == "done"
    # hp 0.5: the pool stored a snapshot at step 0 and was saved beside the checkpoint.
    pool = pipeline["checkpoint"].parent / checkpoint["pool_file"]
    assert len(torch.load(pool, weights_only=True)["snapshots"]) == 1

    # The body came from the torchvision file: three small steps moved its convolutions by
    # ~1 % or less (the stem, whose init is smallest, moves most: ~40 %), while a fresh init
    # differs by ~1.4. The 1000-class head did not fit the 2 classes and kept its own init.
    torchvision_state = torch.load(pipeline["weights"], weights_only=True)
    encoder = checkpoint["encoder"]
    for name in ("layer1.0.conv1.weight", "layer3.5.conv2.weight", "layer4.2.conv3.weight"):
        moved = (encoder[name] - torchvision_state[name]).norm() / torchvision_state[name].norm()
        assert moved < 0.05, (name, float(moved))
    assert encoder["fc.weight"].shape == (CLASSES, 2048)
    assert torchvision_state["fc.weight"].shape == (1000, 2048)

    records = [
        json.loads(line)
        for line in (pipeline["checkpoint"].parent / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["phase"] for r in records] == ["baseline", "casm"]
    assert np.isfinite(records[-1]["train_loss_mapping"])


def test_fp32_torchscript_and_onnx_pass_parity_at_224(pipeline):
    from casm_deploy.artifact import read_metadata

    step, out = pipeline["export fp32"], pipeline["root"] / "fp32"
    report = _report(out)
    assert step.returncode == 0, step.tail()
    checked = report["parity"]
    assert checked["verdict"] == "passed" and checked["passed"]
    images = checked["images"]
    assert images["real"] == 64 and images["val"] == CLASSES * VAL_PER_CLASS
    assert images["train"] == 64 - images["val"] and images["random"] == 16
    assert checked["batch_sizes"] == [1, 3, 64]
    fp32 = dataclasses.asdict(parity.THRESHOLDS["fp32"])
    results = {r["format"]: r for r in checked["results"]}
    assert set(results) == {"torchscript", "onnx"}
    for result in results.values():
        assert result["status"] == "passed", result.get("failures")
        assert result["thresholds"] == fp32  # the bars the README states, not looser ones
        assert set(result["batches"]) == {"1", "3", "64"}
        worst = result["worst"]
        assert worst["max_abs_mask"] <= 1e-4 and worst["boxes_identical"] >= 0.99
        assert worst["argmax_agree"] == 1.0

    sha = hashlib.sha256(pipeline["checkpoint"].read_bytes()).hexdigest()
    for name in ("masker.ts", "masker.onnx"):
        meta = read_metadata(out / name)
        assert (meta["arch"], meta["width"], meta["image_size"]) == ("resnet50", "64", "224")
        assert (meta["num_classes"], meta["precision"]) == (str(CLASSES), "fp32")
        assert json.loads(meta["input"])["shape"] == ["B", 3, SIZE, SIZE]
        outputs = json.loads(meta["outputs"])
        assert outputs["masks"]["shape"] == ["B", 1, SIZE, SIZE]
        assert outputs["logits"]["shape"] == ["B", CLASSES]
        assert json.loads(meta["wnids"]) == _wnids(pipeline["data"])
        assert json.loads(meta["training_config"])["arch"] == "resnet50"
        assert meta["checkpoint_sha256"] == sha

    shapes = _onnx_shapes(out / "masker.onnx")
    batch = shapes["images"][0]
    assert isinstance(batch, str) and batch  # a dynamic batch dimension
    assert shapes == {
        "images": [batch, 3, SIZE, SIZE],
        "masks": [batch, 1, SIZE, SIZE],
        "logits": [batch, CLASSES],
    }


def test_int8_onnx_is_written_loads_and_reports_its_own_bars(pipeline):
    """int8 of this random model fails its box bar, for a reason that is not the exporter's.

    Three steps leave the masks of a random ResNet-50 near-uniform (mostly low) with speckle of
    clutter: a box comes from the binarisation of small fluctuations and jumps under any
    rounding, so box IoU > 0.9 holds on 30-85 % of the images (depending on the weights' seed),
    not 95 %; mean |Δmask| is 0.01-0.04 against its 0.03 bar, and int8 kernels differ between
    CPUs. tests/deploy/export/test_export.py checks the int8 bars on a planted model whose
    masks are blobs.
    Here: the file is int8, it runs at 224 px, and its report applies the int8 bars as stated
    and agrees with the exit status.
    """
    import onnxruntime as ort

    from casm_deploy.artifact import read_metadata

    step, out = pipeline["export int8"], pipeline["root"] / "int8"
    report = _report(out)
    (result,) = report["parity"]["results"]
    assert result["format"] == "onnx" and result["precision"] == "int8"
    limits = parity.THRESHOLDS["int8"]
    assert result["thresholds"] == dataclasses.asdict(limits)
    assert set(result["batches"]) == {"1", "3", "64"}
    failed = [
        reason for stats in result["batches"].values() for reason in parity.verdict(stats, limits)
    ]
    assert (result["status"] == "passed") == (not failed) == (not result["failures"])
    assert (step.returncode == 0) == report["parity"]["passed"]
    # A broken quantisation (a wrong scale, a lost input normalisation) moves the masks by
    # ~0.5 on average; this model's int8 error is an order of magnitude below.
    assert result["worst"]["mean_abs_mask"] < 0.1, result["worst"]
    print(f"int8 parity: {result['status']} {result['failures']} worst {result['worst']}")

    meta = read_metadata(out / "masker.onnx")
    assert (meta["precision"], meta["image_size"], meta["arch"]) == ("int8", "224", "resnet50")
    assert f"calibrated on {CALIBRATION_IMAGES} training images" in meta["exporter"]
    fp32_bytes = (pipeline["root"] / "fp32" / "masker.onnx").stat().st_size
    assert (out / "masker.onnx").stat().st_size < 0.35 * fp32_bytes  # int8 weights

    session = ort.InferenceSession(str(out / "masker.onnx"), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).random((2, 3, SIZE, SIZE), dtype=np.float32)
    masks, logits = session.run(["masks", "logits"], {"images": images})
    assert masks.shape == (2, 1, SIZE, SIZE) and logits.shape == (2, CLASSES)
    assert masks.min() >= 0 and masks.max() <= 1


def test_infer_writes_masks_at_each_original_size(pipeline):
    out, val = pipeline["root"] / "infer", pipeline["data"] / "val"
    files = sorted(p.relative_to(val).as_posix() for p in val.rglob("*.JPEG"))
    assert len(files) == CLASSES * VAL_PER_CLASS

    summary = json.loads((out / "summary.json").read_text())
    assert (summary["ok"], summary["error"], summary["files"]) == (len(files), 0, len(files))
    assert summary["backend"] == "onnx" and summary["image_size"] == SIZE
    assert summary["precision"] == "fp32"

    rows = [json.loads(line) for line in (out / "boxes.jsonl").read_text().splitlines()]
    assert sorted(r["path"] for r in rows) == files
    wnids = _wnids(pipeline["data"])
    for row in rows:
        assert row["status"] == "ok", row
        height, width = cv2.imread(str(val / row["path"])).shape[:2]
        assert 375 <= min(height, width) <= 500
        assert (row["width"], row["height"]) == (width, height)
        mask = cv2.imread(str(out / "masks" / f"{row['path']}.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (height, width) and mask.dtype == np.uint8
        if row["box"] is not None:  # None: nothing above the mask's mean
            x0, y0, x1, y1 = row["box"]
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert row["label"] in wnids and 0 <= row["score"] <= 1
        assert 0 <= row["mask_mean"] <= 1


def _processor() -> tuple[str, bool | None]:
    """The CPU model and whether it has AVX-512 (Linux; elsewhere unknown)."""
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        return "unknown CPU", None
    text = info.read_text()
    names = [line.split(":", 1)[1].strip() for line in text.splitlines() if "model name" in line]
    return (names[0] if names else "unknown CPU"), "avx512f" in text


def test_time_and_peak_memory(pipeline):
    steps = [v for v in pipeline.values() if isinstance(v, Step)]
    cpu, avx512 = _processor()
    print(f"\nResNet-50 at {SIZE} px on {os.cpu_count()} cores of {cpu} (avx512: {avx512})")
    print(f"{'step':<12} {'wall s':>8} {'cpu s':>8} {'peak RSS GiB':>13}")
    for step in steps:
        print(
            f"{step.name:<12} {step.seconds:>8.1f} {step.cpu_seconds:>8.1f} "
            f"{step.peak_rss_gib:>13.2f}"
        )
    print(
        f"{'total':<12} {sum(s.seconds for s in steps):>8.1f} "
        f"{sum(s.cpu_seconds for s in steps):>8.1f} {max(s.peak_rss_gib for s in steps):>13.2f}"
    )
    for step in steps:
        assert 0 < step.peak_rss_gib < MAX_RSS_GIB, (step.name, step.peak_rss_gib)
