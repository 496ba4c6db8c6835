"""The CAM family of the grad-cam package (pytorch-grad-cam, pinned in pyproject.toml) as
`eval --baseline` methods.

Each explains the first model's classifier, as `gradcam.gradcam` does: the map of the stage
`--gradcam-stage` names (`stage_layer`: the module whose output is that feature map, for every
`--arch`), for the class the classifier predicts (top-1: the package's default target, the
argmax of the logits). The package wants `model(x) -> logits`; `Logits` is the classifier with
the normalisation inside, so it takes eval's images in [0, 1] as they are (ScoreCAM's masked
copies are then black where masked, as CASM's masked-out images). The package's maps are
ReLU'd, min-max normalised per image, resized to the input (OpenCV, bilinear) and min-max
normalised again: (B, 1, S, S) masks in [0, 1], a constant map all zeros.

The package is imported when a CAM method is made (`cam_method`), so an eval without one never
loads it, and no method's time per image counts the import.
"""

from __future__ import annotations

import contextlib
import importlib
import io
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from casm_deploy.models.backbones import FAMILIES
from casm_deploy.models.mapping import SaliencyModel

# --baseline name -> the package's class. The names are the ones papers and users write, and
# what eval's tables and JSON call them; pgc-gradcam is the package's Grad-CAM, named apart
# from this project's own (`gradcam`), with which it agrees (tests/evaluation/test_cams.py).
CAMS = {
    "gradcam++": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "eigencam": "EigenCAM",
    "hirescam": "HiResCAM",
    "scorecam": "ScoreCAM",
    "pgc-gradcam": "GradCAM",
}


class Logits(nn.Module):
    """A SaliencyModel's classifier as the package calls it: images in [0, 1] -> logits."""

    def __init__(self, masker: SaliencyModel):
        super().__init__()
        self.masker = masker

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.masker.encoder(self.masker.normalize(images))[0]


def stage_layer(encoder: nn.Module, stage: int) -> nn.Module:
    """The module of `encoder` whose output is its feature map of stage `stage` (1-4), the map
    `encoder.feature_maps(x)[stage]` returns: a ResNet's layer1..layer4; for the other families,
    the module at the family's tap for that stride (`backbones.FAMILIES`: a block of
    `features` for MobileNetV3, EfficientNet and ConvNeXt, a stage of RegNet's trunk).

    Raises:
        ValueError: `stage` is not 1-4.
    """
    if stage not in (1, 2, 3, 4):
        raise ValueError(f"the CAM stage must be 1-4, not {stage}")
    family = FAMILIES.get(encoder.arch)
    if family is None:  # a ResNet (encoder.Encoder)
        return getattr(encoder, f"layer{stage}")
    return family.stages(encoder)[family.taps[stage]]


def cam_method(
    name: str, masker: SaliencyModel, stage: int = 4, batch_size: int = 64
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The package's CAM `name` (a key of CAMS) of `masker`'s classifier at stage `stage` (1-4),
    as a method: images (B, 3, S, S) in [0, 1] -> masks (B, 1, S, S) in [0, 1] and the
    classifier's logits (B, K) (`cam_masks`).

    `batch_size`: ScoreCAM's masked copies per forward (it runs one per channel of the stage's
    map, for each image).

    Raises:
        ValueError: `stage` is not 1-4.
    """
    cam_class = getattr(importlib.import_module("pytorch_grad_cam"), CAMS[name])
    layer = stage_layer(masker.encoder, stage)
    return partial(cam_masks, cam_class, masker, layer, batch_size=batch_size)


def cam_masks(
    cam_class: type,
    masker: SaliencyModel,
    layer: nn.Module,
    images: torch.Tensor,
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The masks of the package's `cam_class` of `masker`'s classifier at its module `layer`,
    and the classifier's logits (`cam_method`).

    ScoreCAM takes the images one at a time (the package stacks all of an image's masked copies
    in memory at once), `batch_size` copies per forward. The package puts the model in eval
    mode (eval's models are) and leaves no gradient on it.
    """
    model = Logits(masker)
    cam = cam_class(model, [layer])
    cam.batch_size = batch_size  # read by ScoreCAM alone
    score = cam_class.__name__ == "ScoreCAM"
    maps, logits = [], []
    try:
        for chunk in images.split(1) if score else [images]:
            # ScoreCAM draws a tqdm bar per image on stderr: kept off eval's output
            quiet = contextlib.redirect_stderr(io.StringIO()) if score else contextlib.nullcontext()
            with torch.set_grad_enabled(cam.uses_gradients), quiet:
                maps.append(torch.from_numpy(cam(chunk, targets=None)))
            logits.append(cam.outputs.detach())
    finally:
        cam.activations_and_grads.release()  # its hooks off the shared classifier
        cam.outputs = None  # and the graph the package kept
        model.zero_grad(set_to_none=True)
    masks = torch.cat(maps)[:, None].clamp_(0, 1).to(images.device)
    return masks, torch.cat(logits)
