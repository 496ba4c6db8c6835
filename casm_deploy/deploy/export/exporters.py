"""The exporters: a SaliencyModel -> masker.ts, masker.pt2, masker.onnx and a Triton repository.

job.run -> (precision: HalfMasker, int8) -> these writers, each file carrying its metadata
(artifact.py) -> parity checks every file -> infer. A model is the SaliencyModel (masks and
logits) or, with `--masks-only`, its MaskMapping (masks alone); the metadata says which.
`export_masker` writes a checkpoint's fp32 files without the parity check: the models of tests
and benchmarks.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from casm_deploy.artifact import (
    INPUT,
    OUTPUTS,
    base_metadata,
    extra_files,
    is_masks_only,
    output_names,
    sha256_file,
    torchscript_warnings,
    write_onnx_metadata,
)
from casm_deploy.checkpoint import export_spec, load_checkpoint, masker_from_checkpoint
from casm_deploy.common.files import make_folders
from casm_deploy.errors import UserError
from casm_deploy.models.mapping import SaliencyModel
from casm_deploy.models.spec import ModelSpec

FILES = {"torchscript": "masker.ts", "onnx": "masker.onnx", "pt2": "masker.pt2"}
BF16_MIN_OPSET = 22  # ONNX Conv accepts bfloat16 from opset 22 on
DEFAULT_OPSET = 18  # the lowest the dynamo exporter supports (ExportConfig.opset's default)
TRACE_CHECK_BATCHES = (1, 3, 5)  # torch.jit.trace re-runs the model at these batch sizes


def export_torchscript(
    model: nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, str]
) -> None:
    """Trace (checked at several batch sizes), freeze and save with the metadata as extra file."""
    checks = [
        (torch.rand(b, *example.shape[1:], device=example.device),) for b in TRACE_CHECK_BATCHES
    ]
    with torch.no_grad(), torchscript_warnings():
        traced = torch.jit.trace(model, example, check_inputs=checks)
        frozen = torch.jit.freeze(traced)
        torch.jit.save(frozen, str(path), _extra_files=extra_files(metadata))


def export_pt2(
    model: nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, str]
) -> None:
    """A torch.export program with a dynamic batch dimension and the metadata as extra file."""
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (example,), dynamic_shapes={INPUT: {0: batch}})
    torch.export.save(program, str(path), extra_files=extra_files(metadata))


def export_onnx(
    model: nn.Module, example: torch.Tensor, path: Path, opset: int, metadata: dict[str, str]
) -> None:
    """ONNX through the dynamo exporter, a dynamic batch, metadata, then a full checker pass.

    `example` holds at least two images, so the exporter cannot specialise the batch to 1. The
    outputs are named as `metadata` says (`masks_only`: masks alone).
    """
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        input_names=[INPUT],
        output_names=list(output_names(is_masks_only(path, metadata))),
        dynamic_shapes={INPUT: {0: batch}},
        opset_version=opset,
        verbose=False,
    )
    program.save(str(path))
    write_onnx_metadata(path, metadata)


def export_masker(
    checkpoint: str | Path,
    folder: str | Path,
    formats: Sequence[str] = ("torchscript", "onnx"),
    opset: int = DEFAULT_OPSET,
    masks_only: bool = False,
) -> dict[str, Path]:
    """A checkpoint's Masker as fp32 files in `folder` (FILES' names), with their metadata but
    no parity check: the tiny or random-weight models tests and benchmarks run. `masks_only`:
    the mapping without the classifier (`export --masks-only`).

    Returns:
        The path of each written format.

    Raises:
        UserError: `masks_only` for a mapping that shares the classifier's encoder.
    """
    checkpoint, folder = Path(checkpoint), Path(folder)
    state = load_checkpoint(checkpoint)
    masker = masker_from_checkpoint(state, checkpoint)
    if masks_only:
        masker = masks_only_of(masker, checkpoint)
    spec = export_spec(state, checkpoint)
    base = base_metadata(spec, state.get("config", {}), sha256_file(checkpoint), masks_only)
    meta = {**base, "precision": "fp32"}
    size = spec.image_size
    example = torch.rand(2, 3, size, size)
    make_folders(folder)
    written = {fmt: folder / FILES[fmt] for fmt in formats}
    for fmt, path in written.items():
        if fmt == "onnx":
            export_onnx(masker, example, path, opset, meta)
        else:
            (export_torchscript if fmt == "torchscript" else export_pt2)(
                masker, example, path, meta
            )
    return written


def masks_only_of(masker: SaliencyModel, path: Path) -> nn.Module:
    """The checkpoint's MaskMapping (eval mode), for `--masks-only`.

    Raises:
        UserError: the mapping shares the classifier's encoder (nothing would be left).
    """
    try:
        return masker.masks_only().eval()
    except UserError as error:
        raise UserError(f"{path}: --masks-only: {error}") from None


def write_triton(
    root: Path,
    name: str,
    onnx_path: Path,
    spec: ModelSpec,
    max_batch: int,
    masks_only: bool = False,
) -> Path:
    """A Triton model repository: ROOT/NAME/config.pbtxt and ROOT/NAME/1/model.onnx (one output,
    `masks`, for a masks-only model)."""
    model_dir = root / name
    make_folders(model_dir / "1")
    shutil.copyfile(onnx_path, model_dir / "1" / "model.onnx")
    size, classes = spec.image_size, spec.num_classes
    what = "mapping alone (--masks-only: no classifier)" if masks_only else "masker"
    logits = f""",
  {{
    name: "{OUTPUTS[1]}"
    data_type: TYPE_FP32
    dims: [ {classes} ]
  }}"""
    (model_dir / "config.pbtxt").write_text(
        f"""# Written by `casm-deploy export --triton`: the CASM {what} on ONNX Runtime.
# Dims exclude the batch; images are RGB float32 in [0, 1] (normalisation is in the graph).
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch}
input [
  {{
    name: "{INPUT}"
    data_type: TYPE_FP32
    dims: [ 3, {size}, {size} ]
  }}
]
output [
  {{
    name: "{OUTPUTS[0]}"
    data_type: TYPE_FP32
    dims: [ 1, {size}, {size} ]
  }}{"" if masks_only else logits}
]
dynamic_batching {{
  max_queue_delay_microseconds: 100
}}
"""
    )
    return model_dir
