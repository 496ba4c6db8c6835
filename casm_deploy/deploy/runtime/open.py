"""Opening a model file: ONNX Runtime, TorchScript, eager (a checkpoint), torch.export.

export -> masker.onnx / masker.ts (or a training checkpoint) -> open_model -> Backend, which
infer, eval and the `casm_deploy.Masker` API call on batches of decoded uint8 images. The
backends are onnxruntime_backend.OnnxBackend and torch_backend's TorchScriptBackend and
EagerBackend. A masks-only export (`info.masks_only`) gives masks and no logits (None).
export's parity check opens each file it wrote with `open_exact` (ProgramBackend for
masker.pt2) and runs it on float images (`predict`): the one way files are opened.

On CUDA a batch goes through `submit` without blocking the calling thread: the images are
copied in from pinned memory on a side stream (device_io.DeviceIO), the model runs, the masks
are turned to uint8 on the device when asked (4x fewer bytes back) and copied out to pinned
memory; `Pending.result()` waits for that copy. infer submits batch N+1 before it takes batch
N's result, so copies, compute and the host's work overlap.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from casm_deploy.artifact import first_line, sha256_file
from casm_deploy.common.devices import resolve_device
from casm_deploy.deploy.runtime.device_io import Image, Outputs, Pending
from casm_deploy.deploy.runtime.info import ModelInfo
from casm_deploy.deploy.runtime.onnxruntime_backend import OnnxBackend
from casm_deploy.deploy.runtime.torch_backend import (
    EagerBackend,
    ProgramBackend,
    TorchBackend,
    TorchScriptBackend,
)
from casm_deploy.errors import UserError

BACKENDS = ("auto", "onnx", "torchscript", "eager")
DEVICES = ("auto", "cpu", "cuda")
SUFFIXES = {".onnx": "onnx", ".ts": "torchscript", ".pt": "eager", ".pth": "eager"}
DEFAULT_BATCH = 64  # the Masker API's batch size; infer passes its --batch


class Backend(Protocol):
    """A model that maps (B, S, S, 3) uint8 RGB images to masks (B, S, S) and logits (B, K),
    or to masks and None (a masks-only model: no classifier).

    The uint8 batch crosses to the device as it is (4x fewer bytes than float32); the scaling
    to [0, 1] happens there, and the normalisation inside the model.
    """

    info: ModelInfo
    notices: list[str]  # what was chosen instead of what `auto` would prefer, and why

    def submit(self, images: Sequence[Image], uint8_masks: bool = False) -> Pending: ...

    def __call__(self, images: Sequence[Image]) -> Outputs: ...

    # float images (B, 3, S, S) in [0, 1], as they are -> masks (B, 1, S, S), logits or None
    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]: ...


def device_type(device: str) -> str:
    """ "cpu" or "cuda" for --device auto, cpu or cuda (`common.devices.resolve_device`)."""
    if device not in DEVICES:
        raise UserError(f"--device {device!r}: choose one of {', '.join(DEVICES)}")
    return resolve_device(device).type


def backend_of(path: Path, backend: str) -> str:
    """The backend for a model file: `backend`, or (auto) the one its suffix names."""
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    suffix = SUFFIXES.get(path.suffix.lower())
    if suffix is None:
        raise UserError(
            f"{path}: unknown model file type; expected .onnx, .ts (from casm-deploy export) "
            "or a .pt checkpoint (from casm-deploy train)"
        )
    if backend != "auto" and backend != suffix:
        raise UserError(f"{path}: a {suffix} model cannot run with --backend {backend}")
    return suffix


def open_model(
    path: str | Path,
    backend: str = "auto",
    device: str = "auto",
    batch: int = DEFAULT_BATCH,
    expect_sha256: str = "",
) -> Backend:
    """Load a model file for inference, for batches of up to `batch` images (TensorRT builds
    its engine for that range; the pinned buffers are that large).

    An ONNX file is data: ONNX Runtime runs only ONNX operators. A TorchScript file is a
    program: loading and calling it runs the code it holds. Its code is inspected first (see
    `artifact.check_torchscript_code`), a safeguard, not a sandbox: use ONNX for files you did not
    make. A checkpoint is read with `weights_only=True`.

    Before anything in the file is parsed, its SHA-256 is compared with `expect_sha256` (if
    given) and with the digest an export.json beside it records for it (if any). Then its
    metadata, its inputs and outputs and one zero image through the model are checked.

    Raises:
        UserError: the file is missing, changed or not a casm-deploy model, the backend does not
            match it, the device asked for is not usable, or the model does not run.
    """
    from casm_deploy.common.ui import console

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such model file")
    kind = backend_of(path, backend)
    resolved = device_type(device)
    sha256 = sha256_file(path)
    check_digest(path, sha256, expect_sha256)
    model: Backend
    if kind == "onnx":
        model = OnnxBackend(path, device, resolved, sha256, batch)
    elif kind == "torchscript":
        model = TorchScriptBackend(path, resolved, sha256, batch)
    else:
        model = EagerBackend(path, resolved, sha256, batch)
    if model.info.training_data == "synthetic":
        from casm_deploy.checkpoint import SYNTHETIC_NOTE

        model.notices.append(SYNTHETIC_NOTE)
    for notice in model.notices:
        console.print(f"[yellow]note:[/yellow] {notice}", soft_wrap=True)  # one line in logs
    probe(model, path)  # after the notices: a TensorRT engine is built here, on the first run
    return model


def open_exact(kind: str, path: Path, device: torch.device) -> Backend:
    """A file export has just written (`kind`: onnx, torchscript or pt2) on `device` exactly,
    for `predict` on float images: what export's parity check measures.

    ONNX Runtime runs it on its CPU provider, or on CUDA on its CUDA provider with TF32 off and
    the CPU (`OnnxBackend.exact`), never TensorRT; torch on `device`. Unlike `open_model`:
    no digest check, no notice printed, no zero image run (`probe`), and what fails raised for
    parity to report (ONNX Runtime's own error, as it is).
    """
    sha256 = sha256_file(path)
    if kind == "onnx":
        return OnnxBackend.exact(path, device, sha256)
    if kind == "torchscript":
        return TorchScriptBackend(path, str(device), sha256, DEFAULT_BATCH)
    return ProgramBackend(path, str(device), sha256, DEFAULT_BATCH)


def check_digest(path: Path, sha256: str, expected: str = "") -> None:
    """Refuse a model file whose SHA-256 is not `expected` (if given) or not the one the
    export.json beside it records for it (written by `casm-deploy export`; if it lists it).

    Raises:
        UserError: `expected` is not a SHA-256, or a digest differs.
    """
    if expected:
        if not re.fullmatch(r"[0-9a-fA-F]{64}", expected.strip()):
            raise UserError(f"--expect-sha256 {expected!r}: not a SHA-256 (64 hex digits)")
        expected = expected.strip().lower()
        if expected != sha256:
            raise UserError(
                f"{path}: refused: its SHA-256 is {sha256}, not the expected {expected}"
            )
    try:
        report = json.loads((path.parent / "export.json").read_text())
        recorded = [f.get("sha256") for f in report["files"].values() if f["file"] == path.name]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # no export.json here, or not one that lists files
    if recorded and recorded[0] != sha256:
        raise UserError(
            f"{path}: refused: its SHA-256 is {sha256}, but the export.json beside it records "
            f"{recorded[0]}: the file was changed after export"
        )


def probe(model: Backend, path: Path) -> None:
    """One zero image through the model, so that a wrong model fails here in one line rather
    than after the first batch of images is decoded.

    Raises:
        UserError: the model fails, or its outputs are not masks (1, 1, S, S) and logits (1, K)
            (masks alone, as a tensor, from a masks-only model).
    """
    info = model.info
    size, classes, masks_only = info.image_size, info.num_classes, info.masks_only
    wanted: list[tuple[int, ...]] = [(1, 1, size, size)] + ([] if masks_only else [(1, classes)])
    want = f"masks (1, 1, {size}, {size})" + ("" if masks_only else f" and logits (1, {classes})")
    try:
        if isinstance(model, TorchBackend):  # the module's own outputs, before `submit`
            with torch.inference_mode():
                outputs = model.module(torch.zeros(1, 3, size, size, device=model.device))
            if isinstance(outputs, torch.Tensor):  # a masks-only module's masks
                outputs = (outputs,)
            shapes = [tuple(t.shape) for t in outputs] if isinstance(outputs, tuple) else []
            if shapes != wanted:
                raise UserError(f"{path}: on one image it returns {shapes or outputs}, not {want}")
        masks, logits = model(np.zeros((1, size, size, 3), np.uint8))
    except UserError:
        raise
    except Exception as error:  # whatever the runtime raises for a graph that does not fit
        raise UserError(
            f"{path}: the model fails on one {size}x{size} image ({first_line(error, 200)})"
        ) from None
    logits_shape = None if logits is None else logits.shape
    if masks.shape != (1, size, size) or logits_shape != (None if masks_only else (1, classes)):
        returned = f"masks {masks.shape}" + (
            "" if logits is None else f" and logits {logits_shape}"
        )
        raise UserError(f"{path}: on one image it returns {returned}, not {want}")
