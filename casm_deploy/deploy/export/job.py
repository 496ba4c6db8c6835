"""Export: a checkpoint -> TorchScript, ONNX and torch.export files that carry their metadata.

Flow: runs/<name>/checkpoint.pt -> `run` -> OUT/masker.ts, masker.onnx, masker.pt2, a Triton
model repository, and OUT/export.json (the metadata and the parity report) -> infer. Every file
is checked against the eager fp32 SaliencyModel (parity.py) before the command succeeds; with
`--masks-only`, the files and the reference are its MaskMapping (no classifier).

The parts: exporters.py writes the files, precision.py makes fp16 / bf16 models and int8 ONNX,
parity.py finds the images and runs and judges each file, opened by the runtime (runtime/).
"""

from __future__ import annotations

import contextlib
import copy
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from casm_deploy.artifact import base_metadata, sha256_file
from casm_deploy.checkpoint import (
    check_decoder_trained,
    export_spec,
    load_checkpoint,
    masker_from_checkpoint,
)
from casm_deploy.common.devices import resolve_device
from casm_deploy.common.files import make_folders
from casm_deploy.common.paths import check_folder
from casm_deploy.common.ui import console, progress
from casm_deploy.config import ExportConfig, config_to_dict
from casm_deploy.deploy.export import parity
from casm_deploy.deploy.export.exporters import (
    BF16_MIN_OPSET,
    FILES,
    export_onnx,
    export_pt2,
    export_torchscript,
    masks_only_of,
    write_triton,
)
from casm_deploy.deploy.export.parity import (
    calibration_batches,
    calibration_source,
    check_parity,
    ieee_fp32,
    parity_images,
    resolve_data,
)
from casm_deploy.deploy.export.precision import DTYPES, HalfMasker, quantize_int8
from casm_deploy.models.spec import ModelSpec

WANTED = "export takes a training checkpoint, runs/<name>/checkpoint.pt"


@dataclass
class Source:
    """What an export is made from and checked on: the checkpoint, its model and the data."""

    path: Path
    checkpoint: dict[str, Any]
    spec: ModelSpec  # the model's description, its data_kind as well as known (`export_spec`)
    # eager fp32, on `device`: the reference and what is exported (the SaliencyModel, or its
    # MaskMapping with --masks-only)
    masker: nn.Module
    device: torch.device
    size: int
    data: Path  # parity (val) and calibration (train) images
    images: np.ndarray  # the parity images, real ones first
    image_source: dict[str, Any]


def run(cfg: ExportConfig) -> dict[str, Any]:
    """Export a checkpoint, check every written file against eager fp32, write export.json.

    Returns:
        The content of OUT/export.json: config, metadata, files and `parity` (with `passed`).

    Raises:
        UserError: the checkpoint or the parity data cannot be read, or CUDA is missing.
    """
    started = time.time()
    source = load_source(cfg)
    opset = onnx_opset(cfg)
    out = clear_out(Path(cfg.out))
    base = base_metadata(
        source.spec,
        source.checkpoint.get("config", {}),
        sha256_file(source.path),
        cfg.masks_only,
    )
    masker = source.masker
    model = masker if cfg.precision not in DTYPES else HalfMasker(masker, DTYPES[cfg.precision])
    model = model.to(source.device).eval()

    with console.status("exporting") as status:
        written = write_files(cfg, source, model, base, opset, out, status)
        triton = None
        if cfg.triton:
            onnx_path = written["onnx"]["path"]
            triton = write_triton(
                out / "triton",
                cfg.triton_name,
                onnx_path,
                source.spec,
                cfg.max_batch,
                cfg.masks_only,
            )

        images = source.images
        runs = len(images) * parity.passes(written)
        with ieee_fp32(), _bar(status, "parity with eager fp32", runs, "images") as advance:
            report = check_parity(
                masker, written, images, source.image_source, source.device, advance
            )

    result = {
        "config": config_to_dict(cfg),
        "metadata": {**base, "precision": cfg.precision},
        "files": described(written, triton, cfg.triton_name, out),
        "parity": report,
        "seconds": round(time.time() - started, 1),
    }
    (out / "export.json").write_text(json.dumps(result, indent=2) + "\n")
    show(result, out)
    return result


def load_source(cfg: ExportConfig) -> Source:
    """The checkpoint's SaliencyModel on the export's device, and the parity images.

    With --masks-only, the SaliencyModel's MaskMapping, before anything is written.

    Raises:
        UserError: OUT, the checkpoint or the data cannot be used, CUDA is missing, or
            --masks-only is asked of a mapping that shares the classifier's encoder.
    """
    check_folder(Path(cfg.out), "--out")
    device = resolve_device(cfg.device)
    path = Path(cfg.checkpoint)
    checkpoint = load_checkpoint(path, WANTED)
    check_decoder_trained(checkpoint, path)  # no export of a random decoder's masks
    masker: nn.Module = masker_from_checkpoint(checkpoint, path)
    if cfg.masks_only:
        masker = masks_only_of(masker, path)
    masker = masker.to(device)
    spec = export_spec(checkpoint, path)
    size = spec.image_size
    data = resolve_data(cfg.data, checkpoint, path)
    images, image_source = parity_images(
        data, list(spec.wnids), size, cfg.parity_images, cfg.parity_random, cfg.seed
    )
    return Source(path, checkpoint, spec, masker, device, size, data, images, image_source)


def onnx_opset(cfg: ExportConfig) -> int:
    """--opset, raised to the first that takes bfloat16 convolutions for a bf16 ONNX file."""
    opset = cfg.opset
    if cfg.precision == "bf16" and cfg.writes_onnx and opset < BF16_MIN_OPSET:
        console.print(f"bf16 ONNX needs opset {BF16_MIN_OPSET}: using it instead of {opset}")
        opset = BF16_MIN_OPSET
    return opset


def clear_out(out: Path) -> Path:
    """OUT, made, without the files of an earlier export."""
    make_folders(out)
    # never leave a file of an earlier export beside this one, nor its export.json (whose
    # digests would then refuse the new files)
    for name in (*FILES.values(), "export.json"):
        (out / name).unlink(missing_ok=True)
    return out


def write_files(
    cfg: ExportConfig,
    source: Source,
    model: nn.Module,
    base: dict[str, str],
    opset: int,
    out: Path,
    status: Any,
) -> dict[str, dict[str, Any]]:
    """Write each format asked for; returns format -> path, precision (and ONNX's opset)."""
    example = torch.rand(
        2, 3, source.size, source.size, generator=torch.Generator().manual_seed(cfg.seed)
    )
    device = source.device
    # int8 is an ONNX Runtime quantisation: the torch formats of an int8 export stay fp32.
    torch_precision = "fp32" if cfg.precision == "int8" else cfg.precision
    written: dict[str, dict[str, Any]] = {}
    if cfg.torchscript:
        status.update("TorchScript: tracing, checking, freezing")
        path = out / FILES["torchscript"]
        meta = {**base, "precision": torch_precision, "exporter": "torch.jit.trace + freeze"}
        export_torchscript(model, example.to(device), path, meta)
        written["torchscript"] = {"path": path, "precision": torch_precision}
    if cfg.pt2:
        status.update("torch.export program")
        path = out / FILES["pt2"]
        meta = {**base, "precision": torch_precision, "exporter": "torch.export"}
        export_pt2(model, example.to(device), path, meta)
        written["pt2"] = {"path": path, "precision": torch_precision}
    if cfg.writes_onnx:
        path = out / FILES["onnx"]
        meta = {**base, "precision": cfg.precision, "opset": str(opset)}
        if cfg.precision == "int8":
            write_int8(cfg, source, example, path, opset, meta, status)
        else:
            status.update(f"ONNX {cfg.precision}, opset {opset}")
            meta["exporter"] = "torch.onnx.export (dynamo)"
            export_onnx(copy.deepcopy(model).cpu(), example, path, opset, meta)
        written["onnx"] = {"path": path, "precision": cfg.precision, "opset": opset}
    return written


def write_int8(
    cfg: ExportConfig,
    source: Source,
    example: torch.Tensor,
    path: Path,
    opset: int,
    meta: dict[str, str],
    status: Any,
) -> None:
    """The fp32 ONNX file, then its int8 quantisation calibrated on training images."""
    status.update("ONNX fp32, then int8 calibration on training images")
    calibration = calibration_source(source.data, list(source.spec.wnids), cfg.calibration_images)
    meta["exporter"] = (
        f"torch.onnx.export (dynamo) + onnxruntime static QDQ, per channel, "
        f"calibrated on {len(calibration)} training images of {source.data}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        export_onnx(copy.deepcopy(source.masker).cpu(), example, fp32, opset, meta)
        batches = calibration_batches(calibration, source.size)
        with _bar(status, "int8 calibration", len(batches), "batches") as advance:
            quantize_int8(fp32, path, batches, meta, on_batch=lambda: advance(1))


def described(
    written: dict[str, dict[str, Any]], triton: Path | None, triton_name: str, out: Path
) -> dict[str, dict[str, Any]]:
    """export.json's `files`: each file's name, size, SHA-256, precision (and opset)."""
    files = {
        fmt: {
            "file": entry["path"].name,
            "bytes": entry["path"].stat().st_size,
            "sha256": sha256_file(entry["path"]),
            **{k: v for k, v in entry.items() if k != "path"},
        }
        for fmt, entry in written.items()
    }
    if triton is not None:
        files["triton"] = {"file": str(triton.relative_to(out)), "name": triton_name}
    return files


@contextlib.contextmanager
def _bar(status: Any, title: str, total: int, unit: str) -> Iterator[Callable[[int], None]]:
    """A progress bar of `total` `unit` in place of the `console.status` spinner (rich shows
    one live display at a time); yields `advance(n)`. Gone when done: the table follows."""
    status.stop()
    try:
        with progress(transient=True) as bars:
            task = bars.add_task(title, total=total, info=unit)
            yield lambda n: bars.advance(task, n)
    finally:
        status.start()


def show(result: dict[str, Any], out: Path) -> None:
    """Print the written files and the parity table."""
    from rich.table import Table

    report = result["parity"]
    images = report["images"]
    table = Table(
        title=f"parity with {report['reference']}: {images['real']} real images "
        f"({images['data']}), {images['random']} random, batch sizes "
        f"{', '.join(map(str, report['batch_sizes']))}"
    )
    for column in ("file", "precision", "backend", "max |Δmask|", "mean |Δmask|", "boxes"):
        table.add_column(column)
    table.add_column("argmax")
    table.add_column("status")
    for r in report["results"]:
        worst = r.get("worst")
        if worst is None:
            cells = ["-"] * 4
        else:
            boxes = (
                f"{worst['boxes_identical']:.1%} same"
                if r["precision"] == "fp32"
                else f"{worst['boxes_iou_above_0.9']:.1%} IoU>0.9"
            )
            argmax = worst.get("argmax_agree")  # none for a masks-only model
            cells = [
                f"{worst['max_abs_mask']:.2e}",
                f"{worst['mean_abs_mask']:.2e}",
                boxes,
                "-" if argmax is None else f"{argmax:.1%}",
            ]
        colour = {"passed": "green", "failed": "red"}.get(r["status"].split(":")[0], "yellow")
        status, _, reason = r["status"].partition(": ")
        table.add_row(
            r["file"], r["precision"], r.get("backend", "-"), *cells, f"[{colour}]{status}[/]"
        )
    console.print(table)
    error = report.get("fp32_error")  # eager fp32 against its float64 copy: fp32's mask bar
    if error is not None:
        console.print(
            f"fp32 bar: max |Δmask| ≤ {error['max_abs_mask_bar']:.2e} ({error['rule']}); eager "
            f"fp32's own, from float64: {error['max_abs_mask']:.2e}"
        )
    for r in report["results"]:
        for failure in r.get("failures", []):
            console.print(f"[red]{r['file']}: {failure}[/]")
        if r["status"].startswith("skipped"):
            console.print(f"[yellow]{r['file']}: {r['status']}[/]")
        if "note" in r:
            console.print(f"{r['file']}: {r['note']}")
    for fmt, entry in result["files"].items():
        size = f"{entry['bytes'] / 1e6:.2f} MB" if "bytes" in entry else ""
        console.print(f"{fmt}: {out / entry['file']} {size}")
    if result["metadata"]["masks_only"] == "true":
        console.print("masks only: images -> masks, no classifier (no logits, no labels)")
    colour = "green" if report["passed"] else "red"
    console.print(
        f"[{colour}]parity {report['verdict']}[/]: {out / 'export.json'} ({result['seconds']} s)"
    )
