"""frontier.png: quality against cost per image, one point per method (frontier.py's rows).

Two panels share a logarithmic cost axis: LE (lower is better) and MaxBoxAccV2 (higher is
better). A method's eager cost is a filled dot; a mapping's ONNX Runtime int8 cost is a ring on
the same row, joined to its dot. Drawn with OpenCV, which the package already needs.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

COLOURS = {  # BGR
    "casm-shared": (40, 40, 200),
    "mapping": (170, 90, 20),
    "gradcam": (30, 150, 30),
    "maskopt": (120, 120, 120),
}
PANEL_W, PANEL_H, MARGIN = 620, 420, 70
FONT = cv2.FONT_HERSHEY_SIMPLEX


def _x(value: float, low: float, high: float) -> int:
    share = (math.log10(value) - low) / (high - low)
    return int(MARGIN + share * (PANEL_W - 2 * MARGIN))


def _y(value: float) -> int:
    return int(PANEL_H - MARGIN - value * (PANEL_H - 2 * MARGIN))


def _axes(panel: np.ndarray, title: str, low: float, high: float) -> None:
    black = (0, 0, 0)
    cv2.rectangle(panel, (MARGIN, MARGIN), (PANEL_W - MARGIN, PANEL_H - MARGIN), black, 1)
    cv2.putText(panel, title, (MARGIN, MARGIN - 20), FONT, 0.6, black, 1, cv2.LINE_AA)
    for tick in np.arange(0, 1.01, 0.25):
        y = _y(tick)
        cv2.line(panel, (MARGIN - 5, y), (MARGIN, y), black, 1)
        cv2.putText(panel, f"{tick:.2f}", (8, y + 5), FONT, 0.45, black, 1, cv2.LINE_AA)
    for power in range(math.floor(low), math.ceil(high) + 1):
        if low <= power <= high:
            x = _x(10.0**power, low, high)
            cv2.line(panel, (x, PANEL_H - MARGIN), (x, PANEL_H - MARGIN + 5), black, 1)
            label = f"{10.0**power:g}"
            cv2.putText(panel, label, (x - 12, PANEL_H - MARGIN + 22), FONT, 0.45, black, 1)
    cv2.putText(
        panel,
        "ms per image (log scale; dot: eager, ring: ONNX Runtime int8)",
        (MARGIN, PANEL_H - 20),
        FONT,
        0.45,
        black,
        1,
        cv2.LINE_AA,
    )


def _panel(rows: list[dict], key: str, title: str, low: float, high: float) -> np.ndarray:
    panel = np.full((PANEL_H, PANEL_W, 3), 255, np.uint8)
    _axes(panel, title, low, high)
    for row in rows:
        colour, y = COLOURS[row["kind"]], _y(row[key])
        x = _x(row["ms_per_image"], low, high)
        int8 = row.get("ms_per_image_ort_int8")
        if int8:
            ring = _x(int8, low, high)
            cv2.line(panel, (ring, y), (x, y), colour, 1, cv2.LINE_AA)
            cv2.circle(panel, (ring, y), 6, colour, 2, cv2.LINE_AA)
        cv2.circle(panel, (x, y), 6, colour, -1, cv2.LINE_AA)
        label = row["method"].replace("mapping ", "")
        cv2.putText(panel, label, (x + 8, y - 8), FONT, 0.4, colour, 1, cv2.LINE_AA)
    return panel


def draw_frontier(rows: list[dict], path: Path, caption: str) -> None:
    """Write the two panels side by side, with `caption` (the images and the machine) below."""
    costs = [row["ms_per_image"] for row in rows]
    costs += [row["ms_per_image_ort_int8"] for row in rows if row.get("ms_per_image_ort_int8")]
    low, high = math.log10(min(costs)) - 0.2, math.log10(max(costs)) + 0.4
    panels = [
        _panel(rows, "LE", "LE (lower is better)", low, high),
        _panel(rows, "MaxBoxAccV2", "MaxBoxAccV2 (higher is better)", low, high),
    ]
    figure = np.concatenate(panels, axis=1)
    footer = np.full((40, figure.shape[1], 3), 255, np.uint8)
    cv2.putText(footer, caption, (MARGIN, 25), FONT, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.concatenate([figure, footer], axis=0)):
        raise OSError(f"could not write {path}")
