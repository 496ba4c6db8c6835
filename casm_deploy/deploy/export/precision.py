"""Precision: the fp16 / bf16 mapping behind float32 tensors, and int8 ONNX quantisation.

export -> HalfMasker (fp16, bf16; a SaliencyModel or its masks-only MaskMapping) -> exporters
(TorchScript, pt2, ONNX); an fp32 ONNX file -> `quantize_int8`, calibrated on training images
(parity.calibration_batches) -> masker.onnx at int8.
"""

from __future__ import annotations

import contextlib
import copy
import io
import sys
import tempfile
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from casm_deploy.artifact import INPUT, OUTPUTS, write_onnx_metadata
from casm_deploy.common.ui import console
from casm_deploy.errors import UserError
from casm_deploy.models.mapping import MaskMapping, SaliencyModel

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class HalfMasker(nn.Module):
    """A SaliencyModel computing in fp16 or bf16 behind float32 `images`, `masks` and `logits`;
    a MaskMapping (`--masks-only`) likewise, with `masks` alone.

    BatchNorm is folded into the convolutions in float32 first, then the weights are rounded
    once. The normalisation and the mask head (the last 3x3 conv, the sigmoid and the
    upsampling) stay in float32: the head sums ~300 channels into one logit per pixel, the step
    where half precision would move the mask most.
    """

    def __init__(self, masker: SaliencyModel | MaskMapping, dtype: torch.dtype):
        super().__init__()
        masker = fold_batchnorm(copy.deepcopy(masker).eval())
        head = copy.deepcopy(masker.decoder.final)  # before .to(dtype) rounds it
        self.masks_only = isinstance(masker, MaskMapping)
        self.encoder = masker.encoder.to(dtype)  # a MaskMapping's: the mapping's own
        # a SaliencyModel whose mapping has an encoder of its own reads its features from it
        mapping_encoder = None if self.masks_only else masker.mapping_encoder
        self.mapping_encoder = None if mapping_encoder is None else mapping_encoder.to(dtype)
        self.decoder = masker.decoder.to(dtype)
        self.decoder.final = nn.Sequential(_Cast(torch.float32), head)
        self.register_buffer("mean", masker.mean.float().clone(), persistent=False)
        self.register_buffer("std", masker.std.float().clone(), persistent=False)
        self.dtype = dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        normalized = ((images - self.mean) / self.std).to(self.dtype)  # computed in float32
        size = images.shape[-2:]
        if self.masks_only:
            return self.decoder(self.encoder.feature_maps(normalized), size=size)
        logits, features = self.encoder(normalized)
        if self.mapping_encoder is not None:
            features = self.mapping_encoder.feature_maps(normalized)
        masks = self.decoder(features, size=size)  # float32 from the head on
        return masks, logits.float()


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm into the conv before it, in place; returns `module`.

    The pairs are torchvision's (`convN` then `bnN` in a block, `downsample`) and the decoder's
    (a conv then a BatchNorm inside an `nn.Sequential`).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for parent in list(module.modules()):
        if isinstance(parent, nn.Sequential):
            for (conv_name, conv), (bn_name, bn) in pairwise(list(parent.named_children())):
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
                    setattr(parent, bn_name, nn.Identity())
        for name, conv in list(parent.named_children()):
            bn_name = name.replace("conv", "bn")
            bn = getattr(parent, bn_name, None) if name.startswith("conv") else None
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(parent, name, fuse_conv_bn_eval(conv, bn))
                setattr(parent, bn_name, nn.Identity())
    return module


class _Cast(nn.Module):
    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype)


# --- int8 -------------------------------------------------------------------------------------


def _calibration_reader(batches: list[np.ndarray], on_batch: Callable[[], None] | None) -> Any:
    """ONNX Runtime's calibration data reader over `batches`, calling `on_batch` at each."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.set_range(0, len(batches))

        def __len__(self) -> int:
            return len(batches)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.batches = iter(batches[start_index:end_index])

        def get_next(self) -> dict[str, np.ndarray] | None:
            images = next(self.batches, None)
            if images is not None and on_batch is not None:
                on_batch()
            return None if images is None else {INPUT: images}

    return Reader()


def quantize_int8(
    fp32_path: Path,
    path: Path,
    batches: list[np.ndarray],
    metadata: dict[str, str],
    on_batch: Callable[[], None] | None = None,
) -> None:
    """Static QDQ int8 quantisation (per-channel weights) calibrated on `batches`.

    The encoder (the classifier, most of the compute; in a masks-only graph, the mapping's own)
    is quantised; the decoder, which only computes the mask, stays in float32 (`mask_head`):
    quantising it doubled the mean mask error on the demo model for little speed. Activation
    ranges are percentiles: outliers of a few calibration images would otherwise stretch the
    int8 grid (min / max where an activation's values are too close for a histogram; the
    metadata's `calibration` says which).

    The batches are calibrated one at a time (ONNX Runtime's `CalibStridedMinMax`, which every
    calibrator honours), each merged into the histograms: in one pass the calibrator holds every
    activation of every image at once, ~125 MB per image for a ResNet-50 at 224 px (~18 GB at
    the default 128 images); one batch of 16 holds ~2 GB. `on_batch` is called as each batch
    goes into the calibrator (a progress bar).
    """
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp, _quiet_print():
        # (print: the histogram calibrator prints its progress)
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))  # shape inference, fusions
        keep = mask_head(onnx.load(str(prepared)), scoped=onnx.load(str(fp32_path)))
        metadata["calibration"] = "percentile"
        try:
            _quantize(prepared, path, _calibration_reader(batches, on_batch), keep, "Percentile")
        except ValueError as error:
            # an activation of (almost) one value, e.g. a squeeze-excitation gate stuck at 0.5,
            # leaves numpy no room for the histogram's 2048 bins: calibrate on min / max instead
            if "Too many bins" not in str(error):
                raise
            metadata["calibration"] = f"minmax (the percentile histogram failed: {error})"
            _quantize(prepared, path, _calibration_reader(batches, None), keep, "MinMax")
    write_onnx_metadata(path, metadata)


def _quantize(source: Path, path: Path, reader: Any, keep: list[str], method: str) -> None:
    """ONNX Runtime's static QDQ quantisation of `source` (the nodes `keep` left in float32),
    activation ranges by the calibration `method` (a `CalibrationMethod` name)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        str(source),
        str(path),
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=keep,
        calibrate_method=CalibrationMethod[method],
        extra_options={"CalibStridedMinMax": 1},  # one batch of activations at a time
    )


@contextlib.contextmanager
def _quiet_print() -> Iterator[None]:
    """`print` to nothing (ONNX Runtime's calibrators print as they go), while the console
    keeps writing to the real stdout (a progress bar drawn meanwhile must still show)."""
    previous = getattr(console, "_file", None)
    console.file = getattr(sys.stdout, "rich_proxied_file", sys.stdout)  # under a live display
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        console.file = previous  # type: ignore[assignment]  # None: follow sys.stdout again


def mask_head(model: Any, scoped: Any = None) -> list[str]:
    """Names of the ONNX nodes int8 leaves in float32: those that compute `masks` only (the
    decoder, and a mapping's own encoder), not `logits`. A masks-only graph has no `logits`:
    there they are the nodes the exporter scoped under the `decoder` module, read from
    `scoped`, the graph as exported (default `model`): ONNX Runtime's pre-processing drops the
    scopes of a graph it rewrites (MobileNetV3's HardSwish), but keeps the decoder's node names.

    Raises:
        UserError: a masks-only graph without the exporter's module scopes.
    """
    if OUTPUTS[1] not in {output.name for output in model.graph.output}:
        names = {node.name for node in model.graph.node}
        return [name for name in decoder_nodes(scoped or model) if name in names]
    producers = {name: node for node in model.graph.node for name in node.output}

    def ancestors(tensor: str) -> set[str]:
        seen, stack = set(), [tensor]
        while stack:
            node = producers.get(stack.pop())
            if node is not None and node.name not in seen:
                seen.add(node.name)
                stack.extend(node.input)
        return seen

    return sorted(ancestors(OUTPUTS[0]) - ancestors(OUTPUTS[1]))


SCOPES = "pkg.torch.onnx.name_scopes"  # the dynamo exporter's module path of a node


def decoder_nodes(model: Any) -> list[str]:
    """Names of the nodes of the top-level `decoder` module, from the dynamo exporter's name
    scopes (['', 'decoder', ...]).

    Raises:
        UserError: no node is scoped under `decoder`.
    """
    import ast

    found = []
    for node in model.graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == SCOPES), "[]")
        with contextlib.suppress(ValueError, SyntaxError):
            path = ast.literal_eval(scopes)
            if isinstance(path, list) and path[1:2] == ["decoder"]:
                found.append(node.name)
    if not found:
        raise UserError(
            "int8 --masks-only: the ONNX graph names no module scopes, so its decoder cannot be "
            "kept in float32; export it at fp32 or fp16"
        )
    return sorted(found)
