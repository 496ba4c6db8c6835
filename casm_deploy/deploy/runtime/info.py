"""What inference knows of a model file: `ModelInfo`, made from the model's `ModelSpec`.

artifact.read_metadata (strings; lists are JSON) -> `info_from_metadata` (`ModelSpec.from_metadata`,
checked key by key) -> ModelInfo -> the backends (onnxruntime_backend, torch_backend), infer's
summary and the Masker API. A checkpoint's: `info_from_spec` (torch_backend's EagerBackend).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from casm_deploy.artifact import is_masks_only
from casm_deploy.config import PRECISIONS
from casm_deploy.errors import UserError
from casm_deploy.models.spec import ModelSpec


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


def info_from_spec(spec: ModelSpec, path: Path, **fields: Any) -> ModelInfo:
    """ModelInfo of a model file whose description is `spec` (`fields`: the rest of it)."""
    return ModelInfo(
        path=str(path),
        image_size=spec.image_size,
        num_classes=spec.num_classes,
        wnids=spec.wnids,
        names=spec.names,
        **fields,
    )


def info_from_metadata(path: Path, meta: dict[str, Any], **fields: Any) -> ModelInfo:
    """ModelInfo from an export's metadata (strings; lists are JSON), checked key by key
    (`ModelSpec.from_metadata`, then the precision).

    Raises:
        UserError: a key is missing or not of its kind (the message names it).
    """
    spec = ModelSpec.from_metadata(meta, path)
    precision = meta.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise UserError(
            f"{path}: metadata precision {precision!r} is not one of {', '.join(PRECISIONS)}"
        )
    return info_from_spec(
        spec,
        path,
        precision=precision,
        training_data=export_training_data(spec),
        masks_only=is_masks_only(path, meta),
        **fields,
    )


def export_training_data(spec: ModelSpec) -> str:
    """The kind of data an export was trained on, from its `training_data` metadata
    (`spec.data_kind`: "synthetic", "images"); for exports made before it was recorded,
    "synthetic" when the classes are `data synth`'s, else "" (not known)."""
    from casm_deploy.checkpoint import SYNTHETIC
    from casm_deploy.data.draw import synthetic_labels

    if spec.data_kind is not None:
        return spec.data_kind
    return SYNTHETIC if synthetic_labels(list(spec.wnids), list(spec.names)) else ""
