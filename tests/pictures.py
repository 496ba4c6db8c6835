"""Synthetic pictures for the decoding tests (imported by them; pytest puts tests/ on the path)."""

import numpy as np


def scene(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth RGB picture with a few bright blocks: each orientation and flip looks different."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 200 // width, y * 200 // height, (x + y) * 100 // (width + height)], 2)
    for _ in range(4):
        y0, x0 = rng.integers(0, height // 2), rng.integers(0, width // 2)
        image[y0 : y0 + height // 4, x0 : x0 + width // 4] = rng.integers(100, 256, 3)
    return image.astype(np.uint8)
