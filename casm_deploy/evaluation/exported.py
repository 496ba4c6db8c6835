"""An exported model file (`export`'s masker.onnx / masker.ts) as a method `eval` scores.

`eval` scores what a user deploys, not only the checkpoint it came from: the file runs in the
runtime infer uses (`deploy.runtime.open.open_model`, on the CPU), on the batches eval's loader
gives, and its masks go through the same scorer. A masks-only export has no classifier: it
gives no logits, and eval has no OM for it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from casm_deploy.artifact import read_metadata
from casm_deploy.models.spec import ModelSpec

EXPORTED_SUFFIXES = (".onnx", ".ts")


def is_exported(path: str | Path) -> bool:
    """Whether `path` names an exported model file rather than a training checkpoint."""
    return Path(path).suffix.lower() in EXPORTED_SUFFIXES


class ExportedMasker(nn.Module):
    """(B,3,S,S) images in [0, 1] -> masks (B,1,S,S) and logits (B,K), or None (masks-only),
    as a checkpoint's SaliencyModel gives them, computed by the exported file.

    The images cross to the runtime as uint8 (its input contract, `runtime.open.Backend`): eval's
    images are decoded 8-bit pixels, resized in float, so this rounds each pixel by at most
    half a level. It has no parameters: it runs on the CPU, where eval's batches are.
    """

    def __init__(self, path: str | Path):
        super().__init__()
        from casm_deploy.deploy.runtime.open import open_model

        self.backend = open_model(path, device="cpu")
        self._spec = ModelSpec.from_metadata(read_metadata(path), path)

    @property
    def masks_only(self) -> bool:
        return self.backend.info.masks_only

    def spec(self) -> ModelSpec:
        """The model's description, from the file's metadata."""
        return self._spec

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
        masks, logits = self.backend(list(pixels.numpy()))
        logits = None if logits is None else torch.from_numpy(logits).float()
        return torch.from_numpy(masks).float().unsqueeze(1), logits
