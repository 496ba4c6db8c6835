"""The exported model file's contract: its tensor names, its metadata, its digest, its loading.

checkpoint -> deploy/export/exporters (write_onnx_metadata, extra_files) -> masker.onnx / .ts / .pt2
-> deploy/runtime, infer and the `casm_deploy.Masker` API (read_metadata, sha256_file,
load_torchscript). Every writer and reader of those files takes the names and the metadata's
layout from here, so a file written by one release is read by the next.

Light on purpose: torch and onnx are imported by the functions that need them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import re
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from casm_deploy.errors import UserError
from casm_deploy.version import __version__

if TYPE_CHECKING:
    import torch

    from casm_deploy.models.spec import ModelSpec

INPUT = "images"
OUTPUTS = ("masks", "logits")  # a full model's; a masks-only model has the first alone
FORMAT = "casm-deploy/masker"  # the metadata's `format`: what marks a casm-deploy export
METADATA_FILE = "casm_metadata.json"  # inside TorchScript and pt2 archives (extra files)


def first_line(error: BaseException, limit: int = 300) -> str:
    """An error's message for a one-line report: its first line, at most `limit` characters."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


# --- metadata ---------------------------------------------------------------------------------


def output_names(masks_only: bool) -> tuple[str, ...]:
    """The graph's outputs, in order: masks and logits, or masks alone (a masks-only model)."""
    return OUTPUTS[:1] if masks_only else OUTPUTS


# The metadata's keys in the order exports have always written them; a key not named here (a
# newer field of the ModelSpec) follows them.
METADATA_ORDER = (
    "format",
    "arch",
    "width",
    "mapping_arch",
    "mapping_width",
    "num_classes",
    "upsample",
    "image_size",
    "masks_only",
    "input",
    "outputs",
    "input_range",
    "normalization",
    "wnids",
    "names",
    "package_version",
    "torch_version",
    "training_config",
    "training_data",
    "checkpoint_sha256",
)


def base_metadata(
    spec: ModelSpec,
    config: dict[str, Any],
    checkpoint_sha256: str,
    masks_only: bool = False,
) -> dict[str, str]:
    """The metadata every artefact carries (strings: ONNX `metadata_props` hold strings).

    Structured values are JSON. Each exporter adds `precision` and `exporter` (and ONNX `opset`).
    The model's own entries are `spec.to_metadata()` (read back by `ModelSpec.from_metadata`):
    arch, width, num_classes, upsample, image_size, wnids, names, `mapping_arch` and
    `mapping_width` for a mapping with an encoder of its own, and `training_data` from
    `spec.data_kind`: "synthetic" for a model of `data synth`'s shapes (infer warns that it means
    nothing on photos), "images" for other data, "unknown" where the checkpoint does not tell
    (the caller passes `checkpoint.export_spec`, which looks for it: this module sits below the
    checkpoint's, which reads its METADATA_FILE to tell an export from a checkpoint). `config`:
    the run's training config, as the checkpoint holds it.

    `masks_only`: the file is the mapping without the classifier (`SaliencyModel.masks_only`),
    one output `masks`; `num_classes`, `wnids` and `names` then still name the classes of the
    classifier it was trained against, which the file does not predict.
    """
    import torch

    from casm_deploy.models.mapping import IMAGENET_MEAN, IMAGENET_STD

    size = spec.image_size
    shapes = {"masks": ["B", 1, size, size], "logits": ["B", spec.num_classes]}
    outputs = {
        name: {"shape": shapes[name], "dtype": "float32"} for name in output_names(masks_only)
    }
    metadata = {
        **spec.to_metadata(),
        "format": FORMAT,
        "masks_only": json.dumps(masks_only),
        "input": json.dumps({"name": INPUT, "shape": ["B", 3, size, size], "dtype": "float32"}),
        "outputs": json.dumps(outputs),
        "input_range": "RGB in [0, 1]",
        "normalization": json.dumps(
            {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "inside_graph": True}
        ),
        "package_version": __version__,
        "torch_version": torch.__version__,
        "training_config": json.dumps(config, sort_keys=True),
        "checkpoint_sha256": checkpoint_sha256,
    }
    return {key: metadata[key] for key in METADATA_ORDER if key in metadata} | metadata


def extra_files(metadata: dict[str, str]) -> dict[str, str]:
    """The metadata as the extra file of a TorchScript or pt2 archive (`_extra_files=`)."""
    return {METADATA_FILE: json.dumps(metadata)}


def write_onnx_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Replace an ONNX file's `metadata_props` by `metadata` and run the full checker."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    outputs = ", ".join(output_names(is_masks_only(path, metadata)))
    model.doc_string = f"casm-deploy masker: images (B,3,H,W) in [0,1] -> {outputs}"
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


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
    if meta.get("format") != FORMAT:
        raise UserError(f"{path}: no casm-deploy metadata (not exported by casm-deploy export)")
    return meta


def is_masks_only(path: str | Path, meta: dict[str, Any]) -> bool:
    """Whether an export's metadata says it has no classifier (one output, `masks`). Files
    written before the key existed are full models.

    Raises:
        UserError: the key is there but neither true nor false.
    """
    value = meta.get("masks_only", "false")
    if value not in ("true", "false", True, False):  # a string in ONNX, either in JSON
        raise UserError(f"{path}: metadata masks_only {value!r} is not true or false")
    return value in ("true", True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- TorchScript: written and loaded with the same warnings silenced ------------------------


@contextlib.contextmanager
def torchscript_warnings() -> Iterator[None]:
    import torch

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


def load_torchscript(path: Path, device: torch.device) -> torch.jit.ScriptModule:
    """Load a TorchScript export after `check_torchscript_code`, then `check_torchscript_graphs`
    (the deprecation warnings silenced as when it was written).

    Raises:
        UserError: the file is not a TorchScript archive, or its code is refused.
    """
    import torch

    check_torchscript_code(path)
    with torchscript_warnings():
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
    import torch

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
    import torch

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
