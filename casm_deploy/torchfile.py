"""Opening a file `torch.load` may read, before anything trusts it: what kind of file it is
(an exported model is named as such, unread), and a weights-only load whose every failure is one
line naming the file. The checkpoint (checkpoint.py) and `train --weights` read through here.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from casm_deploy.artifact import METADATA_FILE
from casm_deploy.errors import UserError

# What `load_checkpoint` and `load_masker` ask for, when the caller does not say it better.
CHECKPOINT_WANTED = "expected a training checkpoint, runs/<name>/checkpoint.pt"
# The top-level modules by which a torchvision classifier's state dict is known: a ResNet's
# stem and head; MobileNetV3's, EfficientNet's and ConvNeXt's features and classifier; RegNet's.
TORCHVISION_MODULES = (("conv1", "fc"), ("features", "classifier"), ("stem", "trunk_output", "fc"))
ONNX_FIELDS = (0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42)  # ModelProto fields 2-8, as tags


def identify(path: str | Path) -> str:
    """What a file that is not a checkpoint is, from its first bytes or its zip directory,
    without unpickling or running anything: "TorchScript", "torch.export (pt2)" or "ONNX" for an
    exported model, "" for anything else (a torch file, or bytes of another kind).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        if head.startswith(b"PK"):
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        else:
            names = []
    except (OSError, zipfile.BadZipFile):
        return ""
    if names:
        if any("/code/" in n or n.startswith("code/") for n in names):
            return "TorchScript"
        if any(n.endswith(f"extra/{METADATA_FILE}") or n.endswith("archive_format") for n in names):
            return "torch.export (pt2)"
        return ""
    # An ONNX ModelProto opens with its ir_version (field 1, a small varint), then the
    # producer, domain, version, doc string, graph or opset fields; a torch pickle with 0x80.
    if len(head) >= 3 and head[0] == 0x08 and head[1] < 0x80 and head[2] in ONNX_FIELDS:
        return "ONNX"
    return ""


def is_torchvision_weights(value: Any) -> bool:
    """A torchvision classifier's state dict: tensors only, under one family's modules."""
    if not isinstance(value, dict) or not value or "format" in value:
        return False
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()):
        return False
    modules = {k.split(".", 1)[0] for k in value}
    return any(modules >= set(family) for family in TORCHVISION_MODULES)


def load_file(path: str | Path, wanted: str = "") -> Any:
    """`torch.load(..., weights_only=True)` with clear errors for missing, foreign or unsafe files.

    An exported model (TorchScript, pt2, ONNX) is named as such before torch reads it, and a
    whole pickled module (`torch.save(model)`) is named by its class: a weights-only load
    refuses both. `wanted`, if given, ends those messages: what the caller takes instead.
    PyTorch's own warnings about the file (a TorchScript archive, `weights_only`) are silenced:
    the error says what the file is.

    Raises:
        UserError: the file is missing, truncated, not a torch file, an exported model, or
            carries pickled objects or code.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    wanted = wanted or CHECKPOINT_WANTED
    kind = identify(path)
    if kind:
        raise UserError(f"{path}: this is an exported model ({kind}); {wanted}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's FutureWarning / UserWarning on odd files
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # A weights-only load names the global it refused ("Unsupported global: posix.system");
        # other unpickling errors mean bytes that are not a pickle at all.
        refused = [line for line in str(error).splitlines() if "global" in line.lower()]
        if refused:
            found = re.search(r"GLOBAL ([\w.]+)", refused[0])
            name = found.group(1) if found else ""
            if name.startswith(("torch.nn.", "torchvision.", "timm.")):
                raise UserError(
                    f"{path}: this is a whole pickled model ({name}, saved with "
                    "torch.save(model)), which casm-deploy does not unpickle (unpickling can run "
                    "code): save its weights, torch.save(model.state_dict(), 'weights.pth'), "
                    f"which train --weights takes; {wanted}"
                ) from None
            detail = refused[0].strip().split(" was not an allowed global")[0]
            raise UserError(
                f"{path}: refused: it carries pickled objects or code that a weights-only load "
                f"does not allow ({detail}). Only load files from sources you trust."
            ) from None
        raise UserError(f"{path}: not a readable checkpoint (not a torch file)") from None
    except Exception as error:  # torch raises many types for foreign bytes (KeyError, ...)
        text = str(error).strip().splitlines()
        raise UserError(
            f"{path}: not a readable checkpoint, or truncated ({text[0] if text else error!r})"
        ) from None
