"""Grad-CAM on the CASM classifier: the baseline most saliency users know.

Masks come out as (B, 1, H, W) in [0, 1] and go through the same scorer as CASM's (binarise at
the mean, largest component, box). Unlike a CASM mask, each one needs a backward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from casm_deploy.models.mapping import SaliencyModel


def gradcam(
    masker: SaliencyModel, images: torch.Tensor, stage: int = 4, classes: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM masks of the encoder's stage `stage` (1-4: l1..l4; 4 is the last).

    The class scored is the predicted one unless `classes` is given; weights are the spatial
    mean of the score's gradient per channel; the map is relu(sum_k w_k A_k), upsampled
    bilinearly to the image size and divided by its maximum.

    Args:
        masker: its encoder is the classifier explained.
        images: (B, 3, H, W) in [0, 1].
        stage: which feature map, 1-4.
        classes: (B,) class indices to explain; None: the predicted ones.

    Returns:
        masks (B, 1, H, W) in [0, 1] and the logits (B, K).
    """
    if stage not in (1, 2, 3, 4):
        raise ValueError(f"Grad-CAM stage must be 1-4, not {stage}")
    with torch.enable_grad():
        logits, features = masker.encoder(masker.normalize(images))
        activations = features[stage]  # (B, C, h, w)
        if classes is None:
            classes = logits.argmax(1)
        scores = logits.gather(1, classes[:, None]).sum()
        (grads,) = torch.autograd.grad(scores, activations)
    weights = grads.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
    cams = F.relu((weights * activations).sum(1, keepdim=True)).detach()  # (B, 1, h, w)
    cams = F.interpolate(cams, size=images.shape[-2:], mode="bilinear", align_corners=False)
    peaks = cams.amax(dim=(2, 3), keepdim=True)
    cams = torch.where(peaks > 0, cams / peaks.clamp_min(1e-12), torch.zeros_like(cams))
    return cams, logits.detach()
