"""The parity run: every file export wrote, run by its runtime, against the eager fp32 model.

export.run -> check_parity (inside ieee_fp32) -> each file opened as a numpy predict function
(ONNX Runtime, torch.jit, torch.export) -> parity.check at every batch size -> the report in
OUT/export.json. A masks-only model (one output) is checked against the eager MaskMapping.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from casm_deploy.artifact import INPUT, OUTPUTS, first_line, load_torchscript
from casm_deploy.deploy import parity
from casm_deploy.deploy.precision import DTYPES


def _torch_predict(model: Any, device: torch.device) -> parity.Predict:
    """A torch module as a predict function: (masks, logits), or a masks-only module's masks."""

    def predict(images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        with torch.no_grad():
            outputs = model(torch.from_numpy(images).to(device))
        masks, logits = (outputs, None) if isinstance(outputs, torch.Tensor) else outputs
        masks = masks.float().cpu().numpy()
        return masks, None if logits is None else logits.float().cpu().numpy()

    return predict


def _onnxruntime_predict(path: Path, device: torch.device) -> tuple[parity.Predict, str]:
    """A bare ONNX Runtime session as a predict function, and the provider it runs on."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the GPU build logs its search for CUDA
    providers: list[Any] = ["CPUExecutionProvider"]
    if device.type == "cuda":  # no TF32: an fp32 graph is checked as true float32
        providers.insert(0, ("CUDAExecutionProvider", {"use_tf32": 0}))
    session = ort.InferenceSession(str(path), options, providers=providers)
    names = [name for name in OUTPUTS if name in {o.name for o in session.get_outputs()}]

    def predict(images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        outputs = session.run(names, {INPUT: images})
        return outputs[0], outputs[1] if len(outputs) > 1 else None  # masks-only: no logits

    return predict, session.get_providers()[0]


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """No TF32 in CUDA convolutions and matmuls: the eager reference must be true float32."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    if hasattr(cudnn, "conv"):  # PyTorch >= 2.9
        name, strict, settings = "fp32_precision", "ieee", (cudnn.conv, matmul)
    else:
        name, strict, settings = "allow_tf32", False, (cudnn, matmul)
    saved = [getattr(s, name) for s in settings]
    for setting in settings:
        setattr(setting, name, strict)
    try:
        yield
    finally:
        for setting, value in zip(settings, saved, strict=True):
            setattr(setting, name, value)


def _counted(predict: parity.Predict, on_images: Callable[[int], None] | None) -> parity.Predict:
    """`predict`, calling `on_images(n)` after each batch of n images (a progress bar)."""
    if on_images is None:
        return predict

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        outputs = predict(batch)
        on_images(len(batch))
        return outputs

    return run


def _open(fmt: str, path: Path, device: torch.device) -> tuple[parity.Predict, str]:
    """A written file as a predict function, and what runs it ("onnxruntime CPU", ...)."""
    if fmt == "onnx":
        predict, provider = _onnxruntime_predict(path, device)
        return predict, f"onnxruntime {provider.removesuffix('ExecutionProvider')}"
    if fmt == "torchscript":
        return _torch_predict(load_torchscript(path, device), device), f"torch.jit {device.type}"
    module = torch.export.load(str(path)).module()
    return _torch_predict(module, device), f"torch.export {device.type}"


def _check_file(
    fmt: str,
    entry: dict[str, Any],
    images: np.ndarray,
    ref: parity.Reference,
    device: torch.device,
    on_images: Callable[[int], None] | None,
) -> dict[str, Any]:
    """One written file's parity result (or why it was skipped, or did not run)."""
    path, precision = entry["path"], entry["precision"]
    result: dict[str, Any] = {"file": path.name, "format": fmt, "precision": precision}
    try:
        predict, result["backend"] = _open(fmt, path, device)
        if fmt == "onnx":
            predict(images[:1])  # a graph ORT cannot run fails here, before the numbers
    except Exception as error:  # ORT raises its own types (NotImplemented, Fail, ...)
        if fmt == "onnx" and precision in DTYPES:
            where = "CUDA" if device.type == "cuda" else "CPU"
            result["status"] = (
                f"skipped: ONNX Runtime's {where} provider cannot run this {precision} graph "
                f"({first_line(error)})"
            )
        else:
            result["status"] = "failed: it does not run"
            result["failures"] = [first_line(error)]
        return result
    result.update(parity.check(_counted(predict, on_images), images, ref, precision))
    if precision in DTYPES and device.type == "cpu" and fmt != "onnx":
        result["note"] = f"{precision} checked on CPU; CUDA kernels not checked (--device cuda)"
    return result


def check_parity(
    masker: torch.nn.Module,
    written: dict[str, dict[str, Any]],
    images: np.ndarray,
    image_source: dict[str, Any],
    device: torch.device,
    on_images: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Check every written file against the eager fp32 masker (the SaliencyModel, or its
    MaskMapping for a masks-only export) on the parity images.

    An fp16 or bf16 ONNX graph that ONNX Runtime cannot run on this device is reported as
    skipped, with the reason; any other failure to run fails the check. `on_images(n)` is
    called as each batch of n images has gone through a model (a progress bar).
    """
    eager = _counted(_torch_predict(masker, device), on_images)
    ref = parity.reference(eager, images, image_source["real"])
    results = [
        _check_file(fmt, entry, images, ref, device, on_images) for fmt, entry in written.items()
    ]
    checked = [r for r in results if not r["status"].startswith("skipped")]
    if not checked:
        verdict = "not checked"  # nothing written could run here: no claim either way
    else:
        verdict = "passed" if all(r["status"] == "passed" for r in checked) else "failed"
    return {
        "passed": verdict == "passed",
        "verdict": verdict,
        "reference": f"eager fp32 on {device.type}",
        "images": image_source,
        "batch_sizes": list(parity.BATCH_SIZES),
        "results": results,
    }
