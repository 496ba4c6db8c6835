"""What the paper does with a mask (§3.3, Fig. 2/3): masked-in, masked-out, inpainted masked-out.

Pure functions on torch batches, the binary mask being the continuous one binarised at its mean
(`metrics.binarize_at_mean`). Used by eval's many-classifiers test and by `visualize`.
"""

from __future__ import annotations

import numpy as np
import torch

from casm_deploy.evaluation.metrics import binarize_at_mean

# Telea's method with the reference's radius (OpenCV INPAINT_TELEA, 3 px).
INPAINT_RADIUS = 3


def binarize(masks: torch.Tensor) -> torch.Tensor:
    """Binarise each mask at its own mean intensity, as the scorer does.

    Args:
        masks: (B,1,H,W) continuous masks in [0, 1].

    Returns:
        (B,1,H,W) bool tensor on the masks' device; True = salient (kept).
    """
    if masks.ndim != 4 or masks.shape[1] != 1:
        raise ValueError(f"expected masks of shape (B,1,H,W), got {tuple(masks.shape)}")
    binary = torch.from_numpy(binarize_at_mean(masks))  # (B,H,W)
    return binary[:, None].to(masks.device)


def masked_in(images: torch.Tensor, binary: torch.Tensor) -> torch.Tensor:
    """`x * b`: keep the salient pixels, black out the rest.

    Args:
        images: (B,3,H,W) float in [0, 1].
        binary: (B,1,H,W) bool or float mask (broadcast over the channels).
    """
    return images * binary.to(images.dtype)


def masked_out(images: torch.Tensor, binary: torch.Tensor) -> torch.Tensor:
    """`x * (1 - b)`: black out the salient pixels, keep the rest.

    Args:
        images: (B,3,H,W) float in [0, 1].
        binary: (B,1,H,W) bool or float mask (broadcast over the channels).
    """
    return images * (1 - binary.to(images.dtype))


def inpaint(images: torch.Tensor, binary: torch.Tensor) -> torch.Tensor:
    """Fill the pixels where `binary` is True from their surroundings (Telea, radius 3).

    Works per image through uint8 (rounded), so the unmasked pixels come back up to 1/255.
    An all-True mask leaves OpenCV nothing to fill from; its result is kept as it is.

    Args:
        images: (B,3,H,W) float in [0, 1].
        binary: (B,1,H,W) bool or float mask; nonzero = fill.

    Returns:
        (B,3,H,W) float in [0, 1], same dtype and device as `images`.
    """
    import cv2

    pixels = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()  # (B,H,W,3)
    holes = (binary.detach()[:, 0] != 0).cpu().numpy().astype(np.uint8)  # (B,H,W)
    filled = np.stack(
        [
            cv2.inpaint(np.ascontiguousarray(image), hole, INPAINT_RADIUS, cv2.INPAINT_TELEA)
            for image, hole in zip(pixels, holes, strict=True)
        ]
    )  # (B,H,W,3) uint8
    result = torch.from_numpy(filled).permute(0, 3, 1, 2).float().div(255)  # (B,3,H,W)
    return result.to(device=images.device, dtype=images.dtype)


__all__ = ["INPAINT_RADIUS", "binarize", "inpaint", "masked_in", "masked_out"]
