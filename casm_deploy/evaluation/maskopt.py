"""Per-image mask optimisation (Fong & Vedaldi 2017, "Interpretable explanations of black boxes
by meaningful perturbation"): the slow baseline that CASM amortises into one forward pass.

For each image a low-resolution deletion mask is optimised with Adam so that the classifier's
softmax score of the class drops once the masked region is deleted (blurred, as in the paper, or
blacked out as the project's masked-out images), under an area (L1) and a total-variation
penalty. Masks come out as (B, 1, H, W) in [0, 1], 1 = salient (deleted), for the same scorer
as CASM's masks and Grad-CAM's.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import gaussian_blur

from casm_deploy.models.mapping import SaliencyModel

FILLS = ("blur", "black")
# Fong & Vedaldi's weights for a 28 x 28 mask of a 224 px image, with sums over mask pixels:
# lambda_1 = 1e-4 (area), lambda_2 = 1e-2 (TV), beta = 3; blur sigma 10 px. The defaults below
# are those weights times 28 * 28, for terms that are means over mask pixels instead.
REFERENCE_SIZE = 224
REFERENCE_PIXELS = 28 * 28
AREA = 1e-4 * REFERENCE_PIXELS
TV = 1e-2 * REFERENCE_PIXELS
BLUR_SIGMA = 10.0  # at 224 px


@dataclass
class OptimizedMasks:
    """The result of `optimize_masks` for a batch of B images of H x W pixels."""

    masks: torch.Tensor  # (B, 1, H, W) in [0, 1]; 1 = deleted = salient
    low_res: torch.Tensor  # (B, 1, h, w) the optimised parameters
    logits: torch.Tensor  # (B, K) of the clean images
    classes: torch.Tensor  # (B,) the class each mask explains
    objective: torch.Tensor  # (B,) the objective of the final masks, without jitter


def reference_images(images: torch.Tensor, fill: str) -> torch.Tensor:
    """What a deleted pixel shows: a blurred copy of the image (sigma 10 px at 224) or black."""
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {', '.join(FILLS)}, not {fill!r}")
    if fill == "black":
        return torch.zeros_like(images)
    sigma = BLUR_SIGMA * images.shape[-1] / REFERENCE_SIZE
    kernel = 2 * math.ceil(3 * sigma) + 1
    return gaussian_blur(images, [kernel, kernel], [sigma, sigma])


def total_variation(masks: torch.Tensor, beta: float) -> torch.Tensor:
    """Per mask, mean over pixels of |dx|^beta + |dy|^beta: (B, 1, h, w) -> (B,)."""
    dx = (masks[..., :, 1:] - masks[..., :, :-1]).abs().pow(beta).flatten(1).sum(1)
    dy = (masks[..., 1:, :] - masks[..., :-1, :]).abs().pow(beta).flatten(1).sum(1)
    return (dx + dy) / masks[0].numel()


def objective(
    masker: SaliencyModel,
    images: torch.Tensor,
    references: torch.Tensor,
    low_res: torch.Tensor,
    classes: torch.Tensor,
    area: float = AREA,
    tv: float = TV,
    tv_beta: float = 3.0,
) -> torch.Tensor:
    """Fong & Vedaldi's deletion objective per image: score + area + TV, (B,).

    Args:
        masker: its encoder is the classifier explained.
        images: (B, 3, H, W) in [0, 1], possibly jittered.
        references: (B, 3, H, W) what deleted pixels show (`reference_images`).
        low_res: (B, 1, h, w) deletion masks in [0, 1].
        classes: (B,) the class whose softmax score the deletion should lower.
        area, tv, tv_beta: the weights of the mean L1 area and of the mean TV^beta of the mask.
    """
    masks = F.interpolate(low_res, size=images.shape[-2:], mode="bilinear", align_corners=False)
    deleted = images * (1 - masks) + references * masks
    logits, _ = masker.encoder(masker.normalize(deleted))
    scores = logits.softmax(1).gather(1, classes[:, None])[:, 0]  # (B,)
    return scores + area * low_res.flatten(1).mean(1) + tv * total_variation(low_res, tv_beta)


def optimize_masks(
    masker: SaliencyModel,
    images: torch.Tensor,
    classes: torch.Tensor | None = None,
    *,
    steps: int = 300,
    lr: float = 0.1,
    mask_size: int | None = None,
    area: float = AREA,
    tv: float = TV,
    tv_beta: float = 3.0,
    fill: str = "blur",
    init: float = 0.5,
    jitter: int | None = None,
    seed: int = 0,
) -> OptimizedMasks:
    """Optimise one deletion mask per image, all images of the batch at once.

    The objective is a sum over images and Adam updates each parameter on its own gradient, so
    the batch is B independent optimisations run together. After each step the masks are
    projected back into [0, 1]. Each step the image (and its reference) is shifted by a random
    jitter of 0..`jitter` pixels in each direction, the paper's guard against adversarial masks.

    Args:
        masker: its encoder is the classifier; its weights are not changed.
        images: (B, 3, H, W) in [0, 1].
        classes: (B,) classes to explain; None: the predicted ones.
        steps: Adam steps.
        lr: Adam's learning rate.
        mask_size: side of the low-resolution mask; None: H // 8 (28 for 224 px, as the paper).
        area, tv, tv_beta: the objective's weights (`objective`).
        fill: `blur` (the paper's perturbation) or `black` (the project's masked-out image).
        init: the masks' starting value (0: nothing deleted).
        jitter: largest shift in pixels; None: H // 56 (4 at 224 px); 0: none.
        seed: seeds the jitter.

    Returns:
        The masks at the image size, the low-resolution ones, the clean logits, the classes and
        each image's final objective (without jitter).
    """
    height, width = images.shape[-2:]
    mask_size = mask_size or max(1, height // 8)
    jitter = height // 56 if jitter is None else jitter
    generator = torch.Generator().manual_seed(seed)
    with frozen(masker):  # gradients flow to the masks only
        with torch.no_grad():
            logits, _ = masker.encoder(masker.normalize(images))
        classes = logits.argmax(1) if classes is None else classes
        references = reference_images(images, fill)
        low_res = torch.full(
            (len(images), 1, mask_size, mask_size), float(init), device=images.device
        )
        terms = (area, tv, tv_beta)
        descend(masker, images, references, low_res, classes, terms, steps, lr, jitter, generator)
        low_res = low_res.detach()
        with torch.no_grad():
            final = objective(masker, images, references, low_res, classes, *terms)
    masks = F.interpolate(low_res, size=(height, width), mode="bilinear", align_corners=False)
    return OptimizedMasks(masks.clamp(0, 1), low_res, logits, classes, final)


@contextlib.contextmanager
def frozen(module: torch.nn.Module) -> Iterator[None]:
    """No gradients for `module`'s weights inside; each gets its own requires_grad back after."""
    weights = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, required in zip(module.parameters(), weights, strict=True):
            parameter.requires_grad_(required)


def descend(
    masker: SaliencyModel,
    images: torch.Tensor,
    references: torch.Tensor,
    low_res: torch.Tensor,
    classes: torch.Tensor,
    terms: tuple[float, float, float],
    steps: int,
    lr: float,
    jitter: int,
    generator: torch.Generator,
) -> None:
    """`steps` Adam steps on the masks `low_res`, in place, each on the objective (weights
    `terms`: area, tv, tv_beta) of images shifted by a random jitter, then clamped to [0, 1]."""
    low_res.requires_grad_(True)
    optimizer = torch.optim.Adam([low_res], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            shift = torch.randint(0, jitter + 1, (2,), generator=generator).tolist()
            loss = objective(
                masker,
                images.roll(shift, dims=(-2, -1)),
                references.roll(shift, dims=(-2, -1)),
                low_res,
                classes,
                *terms,
            ).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                low_res.clamp_(0, 1)
