"""What inference knows of a model file: `ModelInfo`, read from an export's metadata.

artifact.read_metadata (strings; lists are JSON) -> `info_from_metadata`, checked key by key ->
ModelInfo -> the backends (onnxruntime_backend, torch_backend), infer's summary and the Masker
API.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from casm_deploy.artifact import is_masks_only
from casm_deploy.config import PRECISIONS
from casm_deploy.errors import UserError


@dataclass(frozen=True)
class ModelInfo:
    """What inference needs to know about a model file, from its metadata."""

    path: str
    backend: str  # onnx, torchscript or eager (pt2: export's parity check only)
    device: str  # cpu or cuda
    provider: str  # what runs it: an ONNX Runtime provider, or torch.jit / torch on a device
    image_size: int
    num_classes: int
    wnids: tuple[str, ...]
    names: tuple[str, ...]
    precision: str
    sha256: str
    # what it was trained on: "synthetic" (`data synth`'s shapes), "images", or "" (not known)
    training_data: str = ""
    # the mapping without the classifier (`export --masks-only`): masks only, no logits, so no
    # labels; `num_classes`, `wnids` and `names` are those of the classifier it trained with
    masks_only: bool = False

    def label(self, index: int) -> tuple[str, str]:
        """The class id (WordNet id when known) and human name of a logit index."""
        wnid = self.wnids[index] if index < len(self.wnids) else str(index)
        name = self.names[index] if index < len(self.names) else wnid
        return wnid, name


def info_from_metadata(path: Path, meta: dict[str, Any], **fields: Any) -> ModelInfo:
    """ModelInfo from an export's metadata (strings; lists are JSON), checked key by key.

    Raises:
        UserError: a key is missing or not of its kind (the message names it).
    """
    size = positive_field(path, meta, "image_size")
    classes = positive_field(path, meta, "num_classes")
    precision = meta.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise UserError(
            f"{path}: metadata precision {precision!r} is not one of {', '.join(PRECISIONS)}"
        )
    wnids = label_field(path, meta, "wnids", classes)
    names = label_field(path, meta, "names", classes)
    return ModelInfo(
        path=str(path),
        image_size=size,
        num_classes=classes,
        wnids=wnids,
        names=names,
        precision=precision,
        training_data=export_training_data(meta, wnids, names),
        masks_only=is_masks_only(path, meta),
        **fields,
    )


def export_training_data(meta: dict[str, Any], wnids: Sequence[str], names: Sequence[str]) -> str:
    """The kind of data an export was trained on, from its `training_data` metadata
    ("synthetic", "images"); for exports made before it was recorded, "synthetic" when the
    classes are `data synth`'s, else "" (not known)."""
    from casm_deploy.checkpoint import SYNTHETIC
    from casm_deploy.data.draw import synthetic_labels

    recorded = meta.get("training_data")
    if recorded in (SYNTHETIC, "images"):
        return recorded
    return SYNTHETIC if synthetic_labels(list(wnids), list(names)) else ""


def positive_field(path: Path, meta: dict[str, Any], key: str) -> int:
    """A positive integer of the metadata (a string in ONNX metadata, or a JSON number)."""
    if key not in meta:
        raise UserError(f"{path}: its metadata has no {key!r} (not a complete casm-deploy export)")
    value = meta[key]
    if isinstance(value, bool) or not re.fullmatch(r"[0-9]+", str(value)) or int(value) < 1:
        raise UserError(f"{path}: metadata {key} {value!r} is not a positive integer")
    return int(value)


def label_field(path: Path, meta: dict[str, Any], key: str, classes: int) -> tuple[str, ...]:
    """The class ids or names of the metadata: a JSON list of strings, one per class (or none)."""
    value = meta.get(key, "[]")
    try:
        labels = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError:
        labels = None
    if not isinstance(labels, list) or not all(isinstance(v, str) for v in labels):
        raise UserError(f"{path}: metadata {key} is not a JSON list of strings")
    if len(labels) not in (0, classes):
        raise UserError(f"{path}: metadata {key} lists {len(labels)} classes, not {classes}")
    return tuple(labels)
