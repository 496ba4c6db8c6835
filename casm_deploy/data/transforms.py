"""The image transforms of the loaders, and the box and label map transforms that mirror them.

The resize policies (`center-crop`, `stretch`, and in training `random-resized-crop`) as
OpenCV operations on decoded arrays: the torch loader applies them to every image
(`torch_loader.ImageDataset`), DALI's pipeline does the same with its own operators
(`dali.DALILoader`), and `transform_labels` here and `imagenet.transform_box` bring the
annotations into the same model frame.
"""

from __future__ import annotations

import numpy as np

from casm_deploy.errors import UserError

RESIZE_POLICIES = ("center-crop", "stretch")  # the paper's appendix: crop, or break the ratio
# Training also knows torchvision's RandomResizedCrop (the reference's ImageNet augmentation),
# whose validation images, and so boxes, take the centre crop.
TRAIN_RESIZES = (*RESIZE_POLICIES, "random-resized-crop")
# RandomResizedCrop's defaults: the crop's share of the image area, and its aspect ratio.
RRC_SCALE, RRC_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def check_policy(policy: str) -> str:
    """`policy` if it is a resize policy the images and the boxes both know, else a UserError."""
    if policy not in RESIZE_POLICIES:
        raise UserError(f"unknown resize policy {policy!r}: use center-crop or stretch")
    return policy


def validation_policy(resize: str) -> str:
    """The policy of the validation images (and boxes) of a run trained with `resize`."""
    return "center-crop" if resize == "random-resized-crop" else check_policy(resize)


def resize_shorter(image: np.ndarray, size: int, interpolation: int | None = None) -> np.ndarray:
    """Resize so that the shorter side is `size` (area interpolation when shrinking, linear
    when growing, unless `interpolation`, a cv2 flag, says otherwise)."""
    import cv2

    h, w = image.shape[:2]
    scale = size / min(h, w)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if interpolation is None:
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, (new_w, new_h), interpolation=interpolation)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return image[top : top + size, left : left + size]


def stretch(image: np.ndarray, size: int, interpolation: int | None = None) -> np.ndarray:
    """Resize to `size` x `size`, breaking the ratio (area interpolation unless told)."""
    import cv2

    if interpolation is None:
        interpolation = cv2.INTER_AREA
    return cv2.resize(image, (size, size), interpolation=interpolation)


def transform_labels(labels: np.ndarray, size: int, policy: str = "center-crop") -> np.ndarray:
    """Map a label map (H, W) of an image into the `size` x `size` model frame, as the image.

    The geometry of the validation images (`resize_shorter` then `center_crop`, or `stretch`),
    sampled nearest-neighbour so that labels stay labels. cv2's INTER_NEAREST_EXACT samples
    at pixel centres, like the images' area / linear resize; plain INTER_NEAREST is about half
    an output pixel off, towards the top left.
    """
    import cv2

    nearest = cv2.INTER_NEAREST_EXACT
    if validation_policy(policy) == "stretch":
        return stretch(labels, size, nearest)
    return center_crop(resize_shorter(labels, size, nearest), size)


def random_resized_crop_box(
    height: int, width: int, rng: np.random.Generator, scale: tuple[float, float] = RRC_SCALE
) -> tuple[int, int, int, int]:
    """`(top, left, h, w)` of a RandomResizedCrop window, as torchvision's `get_params` draws it.

    Ten tries at a random area share (`scale`, torchvision's RRC_SCALE by default) and
    log-uniform aspect ratio (RRC_RATIO) that fits; failing those, the largest centred window
    whose ratio is within RRC_RATIO.
    """
    area = height * width
    log_ratio = np.log(RRC_RATIO)
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = np.exp(rng.uniform(*log_ratio))
        w, h = round(np.sqrt(target * ratio)), round(np.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    ratio = width / height
    if ratio < RRC_RATIO[0]:
        w, h = width, round(width / RRC_RATIO[0])
    elif ratio > RRC_RATIO[1]:
        h, w = height, round(height * RRC_RATIO[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
    image: np.ndarray, size: int, rng: np.random.Generator, scale: tuple[float, float] = RRC_SCALE
) -> np.ndarray:
    """A RandomResizedCrop(size, scale) of `image`: a random window, resized to size x size."""
    import cv2

    top, left, h, w = random_resized_crop_box(*image.shape[:2], rng, scale)
    window = image[top : top + h, left : left + w]
    interpolation = cv2.INTER_AREA if min(h, w) > size else cv2.INTER_LINEAR
    return cv2.resize(window, (size, size), interpolation=interpolation)
