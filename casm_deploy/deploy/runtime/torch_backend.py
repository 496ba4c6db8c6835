"""The torch runtimes: a TorchScript export (torch.jit), a training checkpoint (eager), or a
torch.export program.

open.open_model -> TorchScriptBackend (artifact.load_torchscript: its code checked first) or
EagerBackend (checkpoint.masker_from_checkpoint) -> `submit` through device_io -> masks and
logits (None from a masks-only export) for infer and the `casm_deploy.Masker` API.
open.open_exact -> TorchScriptBackend or ProgramBackend (masker.pt2) -> `predict` on float
images: export's parity check, which runs its eager reference through `run_module` too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from casm_deploy.artifact import first_line, load_torchscript, read_metadata
from casm_deploy.deploy.runtime.device_io import (
    DeviceIO,
    Image,
    Outputs,
    Pending,
    masks_to_uint8,
    stack_host,
)
from casm_deploy.deploy.runtime.info import ModelInfo, info_from_metadata, info_from_spec
from casm_deploy.errors import UserError


def split_outputs(outputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A module's (masks, logits), or the masks a masks-only module returns alone."""
    return (outputs, None) if isinstance(outputs, torch.Tensor) else outputs


def run_module(
    module: Any, device: torch.device, images: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None]:
    """Float images (B, 3, S, S) in [0, 1], as they are, through a torch module on `device`:
    masks (B, 1, S, S) and logits (B, K) as float32 numpy arrays (None: a masks-only module)."""
    with torch.no_grad():
        outputs = module(torch.from_numpy(images).to(device))
    masks, logits = split_outputs(outputs)
    masks = masks.float().cpu().numpy()
    return masks, None if logits is None else logits.float().cpu().numpy()


class TorchBackend:
    """A torch module taking (B, 3, S, S) float in [0, 1], returning (masks, logits), or the
    masks alone (a masks-only export)."""

    module: Any
    device: torch.device
    info: ModelInfo
    io: DeviceIO | None

    def _setup(self, device: str, batch: int, size: int) -> None:
        self.device = torch.device(device)
        self.io = DeviceIO(self.device, batch, size) if self.device.type == "cuda" else None
        self.notices: list[str] = []

    def __call__(self, images: Sequence[Image]) -> Outputs:
        return self.submit(images).result()

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Float images (B, 3, S, S) in [0, 1], as they are -> masks (B, 1, S, S) and logits
        (B, K), None from a masks-only module (`run_module`)."""
        return run_module(self.module, self.device, images)

    @torch.inference_mode()
    def submit(self, images: Sequence[Image], uint8_masks: bool = False) -> Pending:
        if self.io is None:
            inputs = torch.from_numpy(stack_host(images))
            inputs = inputs.permute(0, 3, 1, 2).float().div_(255)  # channels-last NCHW view
            masks, logits = split_outputs(self.module(inputs))
            masks = masks[:, 0]
            masks = masks_to_uint8(masks) if uint8_masks else masks.float()
            return Pending.done(masks.numpy(), None if logits is None else logits.float().numpy())
        inputs = self.io.to_device(images).permute(0, 3, 1, 2).float().div_(255)
        masks, logits = split_outputs(self.module(inputs))  # queued: the host goes on
        return self.io.to_host(masks[:, 0], logits, uint8_masks)


class TorchScriptBackend(TorchBackend):
    def __init__(self, path: Path, device: str, sha256: str, batch: int):
        meta = read_metadata(path)
        self.info = info_from_metadata(
            path,
            meta,
            backend="torchscript",
            device=device,
            provider=f"torch.jit {device}",
            sha256=sha256,
        )
        self._setup(device, batch, self.info.image_size)
        try:
            self.module = load_torchscript(path, self.device)
        except UserError:
            raise
        except Exception as error:
            raise UserError(
                f"{path}: TorchScript cannot load it ({first_line(error, 200)})"
            ) from None


class ProgramBackend(TorchBackend):
    """A torch.export program (masker.pt2), which export's parity check runs (`open_exact`);
    infer and `Masker.load` do not open .pt2 files (`open.backend_of`)."""

    def __init__(self, path: Path, device: str, sha256: str, batch: int):
        meta = read_metadata(path)
        self.info = info_from_metadata(
            path,
            meta,
            backend="pt2",
            device=device,
            provider=f"torch.export {device}",
            sha256=sha256,
        )
        self._setup(device, batch, self.info.image_size)
        self.module = torch.export.load(str(path)).module()


# What infer and `Masker.load` take, ending the message for a file of another kind.
WANTED = (
    "infer and Masker.load take an export (masker.onnx, masker.ts) or a casm-deploy training "
    "checkpoint, runs/<name>/checkpoint.pt"
)
EXPORT_SUFFIXES = {"TorchScript": ".ts", "ONNX": ".onnx"}


class EagerBackend(TorchBackend):
    """A training checkpoint, run by PyTorch. One whose mask decoder was never trained (a
    classifier) is refused: its masks would be noise."""

    def __init__(self, path: Path, device: str, sha256: str, batch: int):
        from casm_deploy.checkpoint import (
            check_decoder_trained,
            checkpoint_spec,
            load_checkpoint,
            masker_from_checkpoint,
            training_data_kind,
        )
        from casm_deploy.torchfile import identify

        kind = identify(path)
        if kind in EXPORT_SUFFIXES:  # infer chose the runtime by the suffix, .pt or .pth
            raise UserError(
                f"{path}: this is an exported model ({kind}) under a {path.suffix} name; infer "
                f"picks the runtime by the suffix: name it {EXPORT_SUFFIXES[kind]}"
            )
        checkpoint = load_checkpoint(path, WANTED)
        check_decoder_trained(checkpoint, path)
        masker = masker_from_checkpoint(checkpoint, path)
        spec = checkpoint_spec(checkpoint, path)
        self._setup(device, batch, spec.image_size)
        self.module = masker.to(self.device).to(memory_format=torch.channels_last)
        self.info = info_from_spec(
            spec,
            path,
            backend="eager",
            device=device,
            provider=f"torch {device}",
            precision="fp32",
            sha256=sha256,
            training_data=training_data_kind(checkpoint, path),
        )
