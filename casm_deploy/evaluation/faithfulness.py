"""Faithfulness: how much a classifier (the judge) depends on the pixels a mask ranks first.

Every method's masks (the models' and the baselines' alike) are read as an order of the pixels,
most salient first (`pixel_ranks`), and scored by a judge classifier's softmax probability of
each image's true class (`Judge`) as pixels are taken away or given back in that order:

- **Deletion and insertion AUC** (Petsiuk et al., RISE, BMVC 2018), as the authors' code
  (eclique/RISE, `evaluation.py`) computes them: `steps` equal steps (RISE: 224 steps of 224
  pixels), the judge's probability at each of the `steps + 1` images, and the area under
  that curve by the trapezoid rule over the fraction of pixels changed. Deletion replaces the
  pixels, most salient first, by zeros of the classifier's normalised input (RISE's
  `torch.zeros_like` on its normalised tensor), that is the ImageNet mean colour; insertion
  starts from the image blurred by RISE's kernel (`rise_blur`) and puts the original pixels
  back, most salient first. Lower deletion, higher insertion is better.
- **ROAD** (Rong et al., ICML 2022), the grad-cam package's `ROADCombined`: at each percentage
  p of `percentages`, the p% most relevant pixels (MoRF) or the p% least relevant (LeRF) are
  imputed by its `NoisyLinearImputer` (each removed pixel the weighted mean of its eight
  neighbours, a sparse linear system per image, plus noise of std 0.01), on the images in
  [0, 1] (the reference's ImputedDataset applies its transforms, the normalisation among
  them, after imputing); the score is the judge's
  probability after minus before, averaged over the percentages. MoRF: lower is better; LeRF:
  higher; combined (LeRF - MoRF) / 2, as the package defines it: higher.

Ties in a mask (a box baseline is two values; a constant mask one) are broken by one fixed
pseudo-random order of the pixels (`tie_order`), the same for every image and method, as the
ROAD reference breaks them with a fixed small noise: a constant mask then removes pixels in a
random order, not top rows first. Ranks, not values, go to the package, so each percentage
removes that share of pixels whatever the ties (its percentile threshold on a two-valued mask
would remove all or nothing of a value).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from torch import nn

from casm_deploy.models.mapping import IMAGENET_MEAN

KEYS = ("deletion_auc", "insertion_auc", "road_morf", "road_lerf", "road_combined")
INFO_KEYS = ("faithfulness_judge", "n_faithfulness_images")
# RISE's insertion blur at 224 px: an 11 x 11 Gaussian kernel of sigma 5 (gkern(11, 5))
RISE_SIZE, RISE_SIGMA = 224, 5.0


@dataclass(frozen=True)
class Judge:
    """The classifier faithfulness is measured against."""

    name: str  # as the tables and `faithfulness_judge` call it
    model: nn.Module  # images (B, 3, S, S) in [0, 1] -> logits (B, K)
    labels: Sequence[int]  # data label -> the judge's label (-1: a class it does not know)


@dataclass(frozen=True)
class FaithfulnessSettings:
    """What `eval --faithfulness` scores every method with (`Faithfulness`)."""

    judge: Judge
    steps: int = 16  # deletion / insertion: pixels changed in this many equal steps
    percentages: tuple[int, ...] = (20, 40, 60, 80)  # ROAD: shares of pixels removed


@cache
def tie_order(n: int, seed: int = 0) -> np.ndarray:
    """A fixed pseudo-random rank of n pixels, which breaks ties in a mask's values."""
    order = np.random.default_rng(seed).permutation(n)
    order.flags.writeable = False  # one array shared by every call
    return order


def pixel_ranks(maps: np.ndarray) -> np.ndarray:
    """Each pixel's place in its map's order, most salient first: (B, H, W) -> (B, H * W) ints,
    0 the most salient; equal values in `tie_order`."""
    values = maps.reshape(len(maps), -1).astype(np.float64)
    ties = np.broadcast_to(tie_order(values.shape[1]), values.shape)
    order = np.lexsort((ties, -values), axis=-1)  # by value, descending, then by tie_order
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(values.shape[1])[None], axis=-1)
    return ranks


def step_counts(n_pixels: int, steps: int) -> np.ndarray:
    """How many pixels are changed at each of the `steps + 1` points of a curve: 0, about
    n / steps, ..., n (rounded to whole pixels)."""
    return np.round(np.arange(steps + 1) * n_pixels / steps).astype(np.int64)


def trapezoid_auc(fractions: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The area under each curve `scores[..., i]` at `fractions[i]`, by the trapezoid rule
    (RISE's `auc` for equal steps)."""
    widths = np.diff(fractions)
    return (widths * (scores[..., 1:] + scores[..., :-1]) / 2).sum(-1)


def rise_kernel(size: int) -> torch.Tensor:
    """RISE's insertion blur for S x S images: its gkern (a unit impulse smoothed by scipy's
    `gaussian_filter`, within the kernel's window) of sigma 5 and 11 px at 224 px, scaled with
    the image: sigma 5 S / 224, the window 2 floor(sigma) + 1 px wide (at least 3)."""
    sigma = RISE_SIGMA * size / RISE_SIZE
    width = 2 * max(1, math.floor(sigma)) + 1  # 11 at 224 px, as RISE's
    impulse = np.zeros((width, width))
    impulse[width // 2, width // 2] = 1.0
    return torch.from_numpy(gaussian_filter(impulse, sigma)).float()


def rise_blur(images: torch.Tensor) -> torch.Tensor:
    """The images blurred as RISE blurs its insertion start: each channel convolved with
    `rise_kernel`, zero-padded in the classifier's normalised input (here: the mean colour)."""
    kernel = rise_kernel(images.shape[-1]).to(images)
    width = kernel.shape[-1]
    weights = kernel.expand(images.shape[1], 1, width, width)
    mean = mean_colour(images)
    return F.conv2d(images - mean, weights, padding=width // 2, groups=images.shape[1]) + mean


def mean_colour(images: torch.Tensor) -> torch.Tensor:
    """The ImageNet mean colour, (1, 3, 1, 1): what the classifiers' normalisation makes 0."""
    return torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)


def target_probability(
    model: nn.Module, targets: Sequence[int]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """images -> the model's softmax probability of each image's target class, (B,)."""
    index = torch.as_tensor(list(targets))

    def probability(images: torch.Tensor) -> torch.Tensor:
        p = model(images).float().softmax(1)
        return p[torch.arange(len(p)), index.to(p.device)]

    return probability


@torch.no_grad()
def perturbation_curves(
    score: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    finish: torch.Tensor,
    ranks: np.ndarray,
    counts: np.ndarray,
) -> np.ndarray:
    """`score` of the images at each point of the curve, (B, len(counts)): at point i the
    `counts[i]` pixels of lowest rank are `finish`'s, the others `start`'s."""
    b, _, h, w = start.shape
    place = torch.from_numpy(ranks).view(b, 1, h, w).to(start.device)
    curves = [score(torch.where(place < int(k), finish, start)) for k in counts]
    return torch.stack(curves, 1).cpu().numpy()


def deletion_insertion(
    model: nn.Module,
    images: torch.Tensor,
    ranks: np.ndarray,
    targets: Sequence[int],
    steps: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """Each image's deletion and insertion AUC (RISE) for its target class, (B,) each:
    `images` in [0, 1] (B, 3, S, S), `ranks` from `pixel_ranks` of its masks."""
    score = target_probability(model, targets)
    counts = step_counts(ranks.shape[1], steps)
    fractions = counts / ranks.shape[1]
    removed = mean_colour(images).expand_as(images)
    deletion = perturbation_curves(score, images, removed, ranks, counts)
    insertion = perturbation_curves(score, rise_blur(images), images, ranks, counts)
    return trapezoid_auc(fractions, deletion), trapezoid_auc(fractions, insertion)


def road(
    model: nn.Module,
    images: torch.Tensor,
    ranks: np.ndarray,
    targets: Sequence[int],
    percentages: Sequence[int] = (20, 40, 60, 80),
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each image's ROAD MoRF, LeRF and combined score for its target class, (B,) each, by
    the grad-cam package (`ROADCombined`'s two averagers and its formula).

    The package's percentile q keeps the pixels below the q-th percentile of the map and
    imputes the others, so removing p% of them is its percentile 100 - p; the map it gets is
    each pixel's rank, scaled to [0, 1], most salient 1. Its imputer's noise is drawn under
    `seed`, with the global generator's state kept as it was.
    """
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    b, n = ranks.shape
    side = images.shape[-1]
    cams = (1 - ranks / (n - 1)).reshape(b, images.shape[-2], side).astype(np.float32)
    combined = ROADCombined(percentiles=[100 - p for p in percentages])
    outputs = [ClassifierOutputSoftmaxTarget(int(t)) for t in targets]
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)
        # the imputer calls np.argwhere on a tensor, which NumPy 2 warns about: not ours to fix
        warnings.filterwarnings("ignore", "__array_wrap__", DeprecationWarning)
        morf = combined.morf_averager(images, cams, outputs, model)
        lerf = combined.lerf_averager(images, cams, outputs, model)
    return morf, lerf, (lerf - morf) / 2


def faithfulness_scores(
    model: nn.Module,
    images: torch.Tensor,
    maps: np.ndarray,
    targets: Sequence[int],
    steps: int = 16,
    percentages: Sequence[int] = (20, 40, 60, 80),
) -> dict[str, np.ndarray]:
    """Every image's scores under KEYS: `images` (B, 3, S, S) in [0, 1], `maps` its masks
    (B, S, S), `targets` the judge's class of each."""
    ranks = pixel_ranks(maps)
    deletion, insertion = deletion_insertion(model, images, ranks, targets, steps)
    morf, lerf, combined = road(model, images, ranks, targets, percentages)
    return dict(zip(KEYS, (deletion, insertion, morf, lerf, combined), strict=True))


class Faithfulness:
    """Deletion and insertion AUC and ROAD of a method's masks (`faithfulness_scores`), as
    means over the images of classes the judge knows (the others are left out), with the
    judge's name and how many images were scored."""

    def __init__(self, settings: FaithfulnessSettings):
        self.settings = settings
        self.n = 0
        self.sums = dict.fromkeys(KEYS, 0.0)

    def update(self, batch: Any) -> None:
        if batch.images is None or batch.data_labels is None:
            raise ValueError("faithfulness needs the batch's images and their classes")
        judge = self.settings.judge
        targets = [judge.labels[y] for y in batch.data_labels]
        known = [i for i, t in enumerate(targets) if t >= 0]
        if not known:
            return
        scores = faithfulness_scores(
            judge.model,
            batch.images[known],
            batch.arrays[known],
            [targets[i] for i in known],
            self.settings.steps,
            self.settings.percentages,
        )
        for key in KEYS:
            self.sums[key] += float(np.sum(scores[key]))
        self.n += len(known)

    def result(self) -> dict[str, Any]:
        means = {k: (self.sums[k] / self.n if self.n else None) for k in KEYS}
        info = (self.settings.judge.name, self.n)
        return {**means, **dict(zip(INFO_KEYS, info, strict=True))}
