"""Export: a checkpoint -> TorchScript, ONNX and torch.export files that carry their metadata.

Flow: runs/<name>/checkpoint.pt -> `run` -> OUT/masker.ts, masker.onnx, masker.pt2, a Triton
model repository, and OUT/export.json (the metadata and the parity report) -> infer. Every file
is checked against the eager fp32 Masker (parity.py) before the command succeeds.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import io
import json
import re
import shutil
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from casm_deploy import __version__
from casm_deploy.checkpoint import (
    check_decoder_trained,
    load_checkpoint,
    masker_from_checkpoint,
    training_data_kind,
)
from casm_deploy.common.paths import check_folder
from casm_deploy.common.ui import console, progress
from casm_deploy.config import ExportConfig, config_to_dict
from casm_deploy.data.datasets import ImageDataset, list_images
from casm_deploy.deploy import parity
from casm_deploy.errors import UserError
from casm_deploy.models.mapping import IMAGENET_MEAN, IMAGENET_STD, Masker

INPUT = "images"
OUTPUTS = ("masks", "logits")
METADATA_FILE = "casm_metadata.json"  # inside TorchScript and pt2 archives (extra files)
FILES = {"torchscript": "masker.ts", "onnx": "masker.onnx", "pt2": "masker.pt2"}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
BF16_MIN_OPSET = 22  # ONNX Conv accepts bfloat16 from opset 22 on
TRACE_CHECK_BATCHES = (1, 3, 5)  # torch.jit.trace re-runs the model at these batch sizes
CALIBRATION_BATCH = 16
WANTED = "export takes a training checkpoint, runs/<name>/checkpoint.pt"


class HalfMasker(nn.Module):
    """The Masker computing in fp16 or bf16 behind float32 `images`, `masks` and `logits`.

    BatchNorm is folded into the convolutions in float32 first, then the weights are rounded
    once. The normalisation and the mask head (the last 3x3 conv, the sigmoid and the
    upsampling) stay in float32: the head sums ~300 channels into one logit per pixel, the step
    where half precision would move the mask most.
    """

    def __init__(self, masker: Masker, dtype: torch.dtype):
        super().__init__()
        masker = fold_batchnorm(copy.deepcopy(masker).eval())
        head = copy.deepcopy(masker.decoder.final)  # before .to(dtype) rounds it
        self.encoder = masker.encoder.to(dtype)
        self.decoder = masker.decoder.to(dtype)
        self.decoder.final = nn.Sequential(_Cast(torch.float32), head)
        self.register_buffer("mean", masker.mean.float().clone(), persistent=False)
        self.register_buffer("std", masker.std.float().clone(), persistent=False)
        self.dtype = dtype

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        normalized = (images - self.mean) / self.std  # float32
        logits, features = self.encoder(normalized.to(self.dtype))
        masks = self.decoder(features, size=images.shape[-2:])  # float32 from the head on
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


def run(cfg: ExportConfig) -> dict[str, Any]:
    """Export a checkpoint, check every written file against eager fp32, write export.json.

    Returns:
        The content of OUT/export.json: config, metadata, files and `parity` (with `passed`).

    Raises:
        UserError: the checkpoint or the parity data cannot be read, or CUDA is missing.
    """
    started = time.time()
    check_folder(Path(cfg.out), "--out")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device here; export with --device cpu")
    device = torch.device(cfg.device)
    checkpoint_path = Path(cfg.checkpoint)
    checkpoint = load_checkpoint(checkpoint_path, WANTED)
    check_decoder_trained(checkpoint, checkpoint_path)  # no export of a random decoder's masks
    masker = masker_from_checkpoint(checkpoint, checkpoint_path).to(device)
    spec = checkpoint["model"]
    size = int(spec["image_size"])
    data = resolve_data(cfg.data, checkpoint, checkpoint_path)
    images, image_source = parity_images(
        data, spec["wnids"], size, cfg.parity_images, cfg.parity_random, cfg.seed
    )
    opset = cfg.opset
    if cfg.precision == "bf16" and cfg.writes_onnx and opset < BF16_MIN_OPSET:
        console.print(f"bf16 ONNX needs opset {BF16_MIN_OPSET}: using it instead of {opset}")
        opset = BF16_MIN_OPSET

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    # never leave a file of an earlier export beside this one, nor its export.json (whose
    # digests would then refuse the new files)
    for name in (*FILES.values(), "export.json"):
        (out / name).unlink(missing_ok=True)
    base = base_metadata(checkpoint, sha256_file(checkpoint_path), checkpoint_path)
    model = masker if cfg.precision not in DTYPES else HalfMasker(masker, DTYPES[cfg.precision])
    model = model.to(device).eval()
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(cfg.seed))
    # int8 is an ONNX Runtime quantisation: the torch formats of an int8 export stay fp32.
    torch_precision = "fp32" if cfg.precision == "int8" else cfg.precision

    written: dict[str, dict[str, Any]] = {}
    with console.status("exporting") as status:
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
                status.update("ONNX fp32, then int8 calibration on training images")
                calibration = calibration_source(data, spec["wnids"], cfg.calibration_images)
                meta["exporter"] = (
                    f"torch.onnx.export (dynamo) + onnxruntime static QDQ, per channel, "
                    f"calibrated on {len(calibration)} training images of {data}"
                )
                with tempfile.TemporaryDirectory() as tmp:
                    fp32 = Path(tmp) / "fp32.onnx"
                    export_onnx(copy.deepcopy(masker).cpu(), example, fp32, opset, meta)
                    batches = calibration_batches(calibration, size)
                    with _bar(status, "int8 calibration", len(batches), "batches") as advance:
                        quantize_int8(fp32, path, batches, meta, on_batch=lambda: advance(1))
            else:
                status.update(f"ONNX {cfg.precision}, opset {opset}")
                meta["exporter"] = "torch.onnx.export (dynamo)"
                export_onnx(copy.deepcopy(model).cpu(), example, path, opset, meta)
            written["onnx"] = {"path": path, "precision": cfg.precision, "opset": opset}
        triton = None
        if cfg.triton:
            onnx_path = written["onnx"]["path"]
            triton = write_triton(out / "triton", cfg.triton_name, onnx_path, spec, cfg.max_batch)

        runs = len(images) * (1 + len(parity.BATCH_SIZES) * len(written))
        with ieee_fp32(), _bar(status, "parity with eager fp32", runs, "images") as advance:
            report = check_parity(masker, written, images, image_source, device, advance)

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
        files["triton"] = {"file": str(triton.relative_to(out)), "name": cfg.triton_name}
    result = {
        "config": config_to_dict(cfg),
        "metadata": {**base, "precision": cfg.precision},
        "files": files,
        "parity": report,
        "seconds": round(time.time() - started, 1),
    }
    (out / "export.json").write_text(json.dumps(result, indent=2) + "\n")
    show(result, out)
    return result


# --- metadata ---------------------------------------------------------------------------------


def base_metadata(
    checkpoint: dict[str, Any], checkpoint_sha256: str, checkpoint_path: str | Path = ""
) -> dict[str, str]:
    """The metadata every artefact carries (strings: ONNX `metadata_props` hold strings).

    Structured values are JSON. Each exporter adds `precision` and `exporter` (and ONNX `opset`).
    `training_data` is "synthetic" for a model of `data synth`'s shapes (infer warns that it
    means nothing on photos), "images" for other data, "unknown" where the checkpoint does not
    tell (see `checkpoint.training_data_kind`).
    """
    spec = checkpoint["model"]
    size = int(spec["image_size"])
    return {
        "format": "casm-deploy/masker",
        "arch": spec["arch"],
        "width": str(spec["width"]),
        "num_classes": str(spec["num_classes"]),
        "upsample": spec["upsample"],
        "image_size": str(size),
        "input": json.dumps({"name": INPUT, "shape": ["B", 3, size, size], "dtype": "float32"}),
        "outputs": json.dumps(
            {
                "masks": {"shape": ["B", 1, size, size], "dtype": "float32"},
                "logits": {"shape": ["B", int(spec["num_classes"])], "dtype": "float32"},
            }
        ),
        "input_range": "RGB in [0, 1]",
        "normalization": json.dumps(
            {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "inside_graph": True}
        ),
        "wnids": json.dumps(list(spec.get("wnids", []))),
        "names": json.dumps(list(spec.get("names", []))),
        "package_version": __version__,
        "torch_version": torch.__version__,
        "training_config": json.dumps(checkpoint.get("config", {}), sort_keys=True),
        "training_data": training_data_kind(checkpoint, checkpoint_path) or "unknown",
        "checkpoint_sha256": checkpoint_sha256,
    }


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of an exported file (.onnx, .ts or .pt2), without running the model.

    Raises:
        UserError: the file is missing, or not an export of casm-deploy.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.suffix == ".onnx":
        import onnx

        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as error:
            raise UserError(f"{path}: not a readable ONNX model ({error})") from None
        meta = {p.key: p.value for p in model.metadata_props}
    else:  # TorchScript and pt2 are zip archives; the metadata is a member of extra/
        try:
            with zipfile.ZipFile(path) as archive:
                member = next(
                    (n for n in archive.namelist() if n.endswith(f"extra/{METADATA_FILE}")), None
                )
                meta = json.loads(archive.read(member)) if member else {}
        except (zipfile.BadZipFile, json.JSONDecodeError) as error:
            raise UserError(f"{path}: not a TorchScript or pt2 archive ({error})") from None
    if meta.get("format") != "casm-deploy/masker":
        raise UserError(f"{path}: no casm-deploy metadata (not exported by casm-deploy export)")
    return meta


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- the exporters ----------------------------------------------------------------------------


@contextlib.contextmanager
def _torchscript_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        # Recent PyTorch marks every torch.jit entry point deprecated. TorchScript is still what
        # LibTorch (C++) deployments load, so it is written on purpose; --pt2 is its successor.
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", FutureWarning)
        # The decoder compares feature-map sizes in Python. An export fixes H and W, so the
        # traced constant is right; the trace is checked at several batch sizes anyway.
        warnings.filterwarnings(
            "ignore",
            "Converting a tensor to a Python boolean",
            torch.jit.TracerWarning,
            r"casm_deploy\.model",
        )
        yield


def export_torchscript(
    model: nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, str]
) -> None:
    """Trace (checked at several batch sizes), freeze and save with the metadata as extra file."""
    checks = [
        (torch.rand(b, *example.shape[1:], device=example.device),) for b in TRACE_CHECK_BATCHES
    ]
    with torch.no_grad(), _torchscript_warnings():
        traced = torch.jit.trace(model, example, check_inputs=checks)
        frozen = torch.jit.freeze(traced)
        torch.jit.save(frozen, str(path), _extra_files={METADATA_FILE: json.dumps(metadata)})


def load_torchscript(path: Path, device: torch.device) -> torch.jit.ScriptModule:
    """Load a TorchScript export after `check_torchscript_code`, then `check_torchscript_graphs`
    (the deprecation warnings silenced as when it was written).

    Raises:
        UserError: the file is not a TorchScript archive, or its code is refused.
    """
    check_torchscript_code(path)
    with _torchscript_warnings():
        module = torch.jit.load(str(path), map_location=device)
    check_torchscript_graphs(module, path)
    return module


# --- what a TorchScript file may do -----------------------------------------------------------
#
# A TorchScript file is a program, not data: torch.jit.load runs its `__setstate__` methods and
# every call runs its `forward`, with any operator PyTorch has, file I/O included (ONNX is data:
# ONNX Runtime runs only ONNX operators). A masker needs tensor maths only, so a file is refused
# when its code uses an operator outside aten:: and prim::, one that reads or writes a file, or a
# call into code its graph does not show. This is a safeguard against a tampered file, not a
# sandbox: load TorchScript only from sources you trust.

SAFE_NAMESPACES = ("aten", "prim")
OPAQUE_CALLS = ("prim::PythonOp", "prim::IgnoredPythonOp", "prim::CallFunction", "prim::CallMethod")
FILE_ARGUMENTS = ("filename", "file", "path", "fname", "filepath", "directory")
FILE_OPERATORS = ("aten::from_file", "aten::save", "aten::load")  # named too: schemas change


@functools.cache
def file_operators() -> frozenset[str]:
    """The operators that touch files: FILE_OPERATORS and every registered operator with a
    string argument naming a file."""
    found = set(FILE_OPERATORS)
    for schema in torch._C._jit_get_all_schemas():
        if any(a.name in FILE_ARGUMENTS and "str" in str(a.type) for a in schema.arguments):
            found.add(schema.name)
    return frozenset(found)


def _refuse(path: Path, what: str) -> None:
    raise UserError(
        f"{path}: refused: its TorchScript code uses {what}, which a masker never needs (a "
        "TorchScript file is a program: load only files you trust; ONNX files are data)"
    )


def check_torchscript_code(path: Path) -> None:
    """Read an archive's serialized code (its `code/*.py` records, TorchScript source) before
    torch.jit.load runs any of it, with torch's own zip reader: the records torch will read.

    Raises:
        UserError: not a TorchScript archive, or its code names an operator of another
            namespace, a custom class or a file operator.
    """
    try:
        reader = torch._C.PyTorchFileReader(str(path))
        records = reader.get_all_records()
    except RuntimeError as error:
        raise UserError(f"{path}: not a TorchScript archive ({first_line(error)})") from None
    sources = [r for r in records if r.endswith(".py")]
    if not any(r.startswith("code/") for r in sources):
        raise UserError(f"{path}: no TorchScript code in it (not written by torch.jit.save)")
    file_names = {name.split("::")[1]: name for name in file_operators()}
    for record in sources:
        text = reader.get_record(record).decode("utf-8", "replace")
        for namespace in re.findall(r"\bops\.(\w+)\.", text):  # ops.NS.name(...): a foreign op
            if namespace not in SAFE_NAMESPACES:
                _refuse(path, f"{namespace}:: operators")
        if re.search(r"\btorch\.classes\b", text):
            _refuse(path, "a custom class")
        # any word that is a file operator's name, however it is reached (torch.X, ops.aten.X)
        for word in sorted(set(re.findall(r"\w+", text)) & file_names.keys()):
            _refuse(path, file_names[word])


def check_torchscript_graphs(module: torch.jit.ScriptModule, path: Path) -> None:
    """Check every node of every method and hook of every submodule, calls inlined, before the
    module is first called: only aten:: and prim:: operators, no file operator, no opaque call.

    Raises:
        UserError: a node is refused (the message names its operator).
    """
    denied = file_operators()
    for submodule in module.modules():
        scripted = submodule._c
        functions = [scripted._get_method(name) for name in scripted._method_names()]
        functions += [*scripted._get_forward_pre_hooks(), *scripted._get_forward_hooks()]
        for function in functions:
            graph = getattr(function, "inlined_graph", None) or function.graph
            for node in _all_nodes(graph.nodes()):
                kind = node.kind()
                if kind.split("::")[0] not in SAFE_NAMESPACES:
                    _refuse(path, kind)
                if kind in denied or kind in OPAQUE_CALLS:
                    _refuse(path, kind)


def _all_nodes(nodes: Any) -> Iterator[Any]:
    """Nodes with those of their blocks (if, loop) and subgraphs (fork), depth first."""
    for node in nodes:
        yield node
        for block in node.blocks():
            yield from _all_nodes(block.nodes())
        for name in node.attributeNames():
            if node.kindOf(name) == "g":
                yield from _all_nodes(node.g(name).nodes())


def export_pt2(
    model: nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, str]
) -> None:
    """A torch.export program with a dynamic batch dimension and the metadata as extra file."""
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (example,), dynamic_shapes={INPUT: {0: batch}})
    torch.export.save(program, str(path), extra_files={METADATA_FILE: json.dumps(metadata)})


def export_onnx(
    model: nn.Module, example: torch.Tensor, path: Path, opset: int, metadata: dict[str, str]
) -> None:
    """ONNX through the dynamo exporter, a dynamic batch, metadata, then a full checker pass.

    `example` holds at least two images, so the exporter cannot specialise the batch to 1.
    """
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        input_names=[INPUT],
        output_names=list(OUTPUTS),
        dynamic_shapes={INPUT: {0: batch}},
        opset_version=opset,
        verbose=False,
    )
    program.save(str(path))
    write_onnx_metadata(path, metadata)


def write_onnx_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Replace an ONNX file's `metadata_props` by `metadata` and run the full checker."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    model.doc_string = "casm-deploy masker: images (B,3,H,W) in [0,1] -> masks, logits"
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def quantize_int8(
    fp32_path: Path,
    path: Path,
    batches: list[np.ndarray],
    metadata: dict[str, str],
    on_batch: Callable[[], None] | None = None,
) -> None:
    """Static QDQ int8 quantisation (per-channel weights) calibrated on `batches`.

    The encoder (the classifier, most of the compute) is quantised; the decoder, which only
    computes the mask, stays in float32: quantising it doubled the mean mask error on the demo
    model for little speed. Activation ranges are percentiles: outliers of a few calibration
    images would otherwise stretch the int8 grid.

    The batches are calibrated one at a time (ONNX Runtime's `CalibStridedMinMax`, which every
    calibrator honours), each merged into the histograms: in one pass the calibrator holds every
    activation of every image at once, ~125 MB per image for a ResNet-50 at 224 px (~18 GB at
    the default 128 images); one batch of 16 holds ~2 GB. `on_batch` is called as each batch
    goes into the calibrator (a progress bar).
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

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

    with tempfile.TemporaryDirectory() as tmp, _quiet_print():
        # (print: the histogram calibrator prints its progress)
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))  # shape inference, fusions
        quantize_static(
            str(prepared),
            str(path),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=mask_head(onnx.load(str(prepared))),
            calibrate_method=CalibrationMethod.Percentile,
            extra_options={"CalibStridedMinMax": 1},  # one batch of activations at a time
        )
    write_onnx_metadata(path, metadata)


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


def mask_head(model: Any) -> list[str]:
    """Names of the ONNX nodes that compute `masks` only (the decoder), not `logits`."""
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


def write_triton(
    root: Path, name: str, onnx_path: Path, spec: dict[str, Any], max_batch: int
) -> Path:
    """A Triton model repository: ROOT/NAME/config.pbtxt and ROOT/NAME/1/model.onnx."""
    model_dir = root / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_path, model_dir / "1" / "model.onnx")
    size, classes = int(spec["image_size"]), int(spec["num_classes"])
    (model_dir / "config.pbtxt").write_text(
        f"""# Written by `casm-deploy export --triton`: the CASM masker on ONNX Runtime.
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
  }},
  {{
    name: "{OUTPUTS[1]}"
    data_type: TYPE_FP32
    dims: [ {classes} ]
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: 100
}}
"""
    )
    return model_dir


# --- data for parity and calibration ----------------------------------------------------------


def resolve_data(data: str, checkpoint: dict[str, Any], checkpoint_path: Path) -> Path:
    """The data folder: `data` if given, else the checkpoint's training data.

    A relative training path is looked up from the working directory, then from each folder
    above the checkpoint (a run trained in /x with data/synth lives in /x/runs/<name>/).

    Raises:
        UserError: the folder is not found.
    """
    if data:
        if not Path(data).is_dir():
            raise UserError(f"--data {data}: no such folder")
        return Path(data)
    trained = (checkpoint.get("config") or {}).get("data")
    if not trained:
        raise UserError(
            f"{checkpoint_path}: the checkpoint does not name its data; parity needs real "
            "images: pass --data DIR (an ImageNet-layout folder of its classes)"
        )
    candidates = [Path(trained)]
    if not Path(trained).is_absolute():
        candidates += [folder / trained for folder in checkpoint_path.resolve().parents]
    for folder in candidates:
        if folder.is_dir():
            return folder
    raise UserError(
        f"{checkpoint_path}: its training data {trained!r} is not here (looked in the working "
        "directory and above the checkpoint); parity needs real images: pass --data DIR"
    )


def _spread(samples: list[Any], count: int) -> list[Any]:
    """`count` items spread evenly over `samples` (sorted by class: every class is drawn)."""
    if count >= len(samples):
        return list(samples)
    picks = np.linspace(0, len(samples) - 1, num=count).round().astype(int)
    return [samples[i] for i in picks]


def _load(samples: list[tuple[Path, int]], size: int) -> np.ndarray:
    """Decode, shorter side to `size`, centre crop: (N, 3, S, S) float32 in [0, 1]."""
    dataset = ImageDataset(samples, size, train=False)
    images = np.stack([dataset[i][0] for i in range(len(dataset))])  # (N, S, S, 3) uint8
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / 255


def parity_images(
    data: Path, wnids: list[str], size: int, real: int, random: int, seed: int
) -> tuple[np.ndarray, dict[str, Any]]:
    """`real` validation images (topped up from train when val is smaller), then `random` ones.

    Returns:
        images (N, 3, S, S) float32 in [0, 1], real first; and where they came from.

    Raises:
        UserError: the folder has fewer than `real` images of the model's classes.
    """
    samples = _spread(list_images(data, "val", wnids), real)
    source = {"data": str(data), "val": len(samples), "train": 0, "random": random}
    if len(samples) < real:
        train = list_images(data, "train", wnids) if (data / "train").is_dir() else []
        extra = _spread(train, real - len(samples))
        if len(samples) + len(extra) < real:
            raise UserError(
                f"{data}: {len(samples) + len(extra)} images of the model's classes; "
                f"parity needs {real}"
            )
        samples += extra
        source["train"] = len(extra)
    noise = np.random.default_rng(seed).random((random, 3, size, size), dtype=np.float32)
    return np.concatenate([_load(samples, size), noise]), {**source, "real": real}


def calibration_source(data: Path, wnids: list[str], count: int) -> list[tuple[Path, int]]:
    """The training images that calibrate int8 activations, spread over the classes."""
    return _spread(list_images(data, "train", wnids), count)


def calibration_batches(samples: list[tuple[Path, int]], size: int) -> list[np.ndarray]:
    """The images in equal batches (ONNX Runtime's histogram calibrators stack them)."""
    images = _load(samples, size)
    batch = min(CALIBRATION_BATCH, len(images))
    return [images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)]


# --- parity -----------------------------------------------------------------------------------


def _torch_predict(model: Any, device: torch.device) -> parity.Predict:
    def predict(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            masks, logits = model(torch.from_numpy(images).to(device))
        return masks.float().cpu().numpy(), logits.float().cpu().numpy()

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

    def predict(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        masks, logits = session.run(list(OUTPUTS), {INPUT: images})
        return masks, logits

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


def check_parity(
    masker: Masker,
    written: dict[str, dict[str, Any]],
    images: np.ndarray,
    image_source: dict[str, Any],
    device: torch.device,
    on_images: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Check every written file against the eager fp32 masker on the parity images.

    An fp16 or bf16 ONNX graph that ONNX Runtime cannot run on this device is reported as
    skipped, with the reason; any other failure to run fails the check. `on_images(n)` is
    called as each batch of n images has gone through a model (a progress bar).
    """

    def counted(predict: parity.Predict) -> parity.Predict:
        if on_images is None:
            return predict

        def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            outputs = predict(batch)
            on_images(len(batch))
            return outputs

        return run

    ref = parity.reference(counted(_torch_predict(masker, device)), images, image_source["real"])
    results = []
    for fmt, entry in written.items():
        path, precision = entry["path"], entry["precision"]
        result: dict[str, Any] = {"file": path.name, "format": fmt, "precision": precision}
        try:
            if fmt == "onnx":
                predict, provider = _onnxruntime_predict(path, device)
                result["backend"] = f"onnxruntime {provider.removesuffix('ExecutionProvider')}"
                predict(images[:1])  # a graph ORT cannot run fails here, before the numbers
            elif fmt == "torchscript":
                predict = _torch_predict(load_torchscript(path, device), device)
                result["backend"] = f"torch.jit {device.type}"
            else:
                predict = _torch_predict(torch.export.load(str(path)).module(), device)
                result["backend"] = f"torch.export {device.type}"
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
            results.append(result)
            continue
        result.update(parity.check(counted(predict), images, ref, precision))
        if precision in DTYPES and device.type == "cpu" and fmt != "onnx":
            result["note"] = f"{precision} checked on CPU; CUDA kernels not checked (--device cuda)"
        results.append(result)
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


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


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
            cells = [
                f"{worst['max_abs_mask']:.2e}",
                f"{worst['mean_abs_mask']:.2e}",
                boxes,
                f"{worst['argmax_agree']:.1%}",
            ]
        colour = {"passed": "green", "failed": "red"}.get(r["status"].split(":")[0], "yellow")
        status, _, reason = r["status"].partition(": ")
        table.add_row(
            r["file"], r["precision"], r.get("backend", "-"), *cells, f"[{colour}]{status}[/]"
        )
    console.print(table)
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
    colour = "green" if report["passed"] else "red"
    console.print(
        f"[{colour}]parity {report['verdict']}[/]: {out / 'export.json'} ({result['seconds']} s)"
    )
