"""peers.png: milliseconds per image of each method and runtime at one batch size (peers.py's rows).

One horizontal bar per method and runtime, slowest at the top, on a logarithmic axis, coloured
by where the masks come from, its figure at the bar's end. Drawn with OpenCV, which the package
already needs (as frontier_plot.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

COLOURS = {  # BGR
    "pytorch-grad-cam": (40, 120, 230),
    "captum": (150, 60, 150),
    "gradcam": (30, 150, 30),
    "casm-shared": (40, 40, 200),
    "mapping": (170, 90, 20),
}
LABEL_W, BAR_W, RIGHT, TOP, ROW_H, BOTTOM = 360, 560, 90, 50, 26, 70
FONT = cv2.FONT_HERSHEY_SIMPLEX
BLACK = (0, 0, 0)


def _x(value: float, low: float, high: float) -> int:
    return int(LABEL_W + (math.log10(value) - low) / (high - low) * BAR_W)


def draw_peers(rows: list[dict], batch: int, path: Path, caption: str) -> None:
    """Write the bars of `rows` at batch `batch` (those with a time) to `path`, `caption` below."""
    bars = [r for r in rows if r["batch"] == batch and r.get("ms_per_image")]
    bars.sort(key=lambda r: -r["ms_per_image"])
    width = LABEL_W + BAR_W + RIGHT
    height = TOP + ROW_H * max(1, len(bars)) + BOTTOM
    image = np.full((height, width, 3), 255, np.uint8)
    title = f"ms per image at batch {batch} (log scale), 224 px, lower is better"
    cv2.putText(image, title, (10, 28), FONT, 0.6, BLACK, 1, cv2.LINE_AA)
    if bars:
        costs = [r["ms_per_image"] for r in bars]
        low = math.floor(math.log10(min(costs)) - 0.1)
        high = math.log10(max(costs)) + 0.15
        bottom = TOP + ROW_H * len(bars)
        for power in range(low, math.floor(high) + 1):
            x = _x(10.0**power, low, high)
            cv2.line(image, (x, TOP - 5), (x, bottom), (210, 210, 210), 1)
            cv2.putText(image, f"{10.0**power:g}", (x - 10, bottom + 18), FONT, 0.45, BLACK, 1)
        for k, row in enumerate(bars):
            y = TOP + ROW_H * k
            colour = COLOURS.get(row["kind"], (120, 120, 120))
            label = f"{row['method']}, {row['runtime']}"
            cv2.putText(image, label, (10, y + 17), FONT, 0.45, BLACK, 1, cv2.LINE_AA)
            end = _x(row["ms_per_image"], low, high)
            cv2.rectangle(
                image, (LABEL_W, y + 4), (max(end, LABEL_W + 1), y + ROW_H - 4), colour, -1
            )
            figure = f"{row['ms_per_image']:.3g}"
            cv2.putText(image, figure, (end + 5, y + 17), FONT, 0.45, BLACK, 1, cv2.LINE_AA)
    cv2.putText(image, caption, (10, height - 15), FONT, 0.45, BLACK, 1, cv2.LINE_AA)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"could not write {path}")
