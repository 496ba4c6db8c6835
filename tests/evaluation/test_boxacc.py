"""MaxBoxAccV2 on hand-built masks whose boxes and IoUs are known, and against a transcription
of the authors' code (wsolevaluation) on random maps.

Their IoU counts boxes as inclusive pixel boxes: area (x1 - x0 + 1) * (y1 - y0 + 1). A box
from a contour is [x, y, x + w, y + h], clipped to W - 1 / H - 1; ground-truth boxes enter as
given. The hand-worked values below follow these.
"""

import cv2
import numpy as np
import pytest

from casm_deploy.evaluation.boxacc import (
    THRESHOLDS,
    BoxAccMeter,
    best_ious,
    block_size,
    box_ious,
    contour_boxes,
    levels,
    normalize,
    quantize,
    tile_boxes,
)


def two_level(strong, weak, size=10):
    """A mask of 1.0 over the box `strong` and 0.5 over the box `weak` (x0, y0, x1, y1)."""
    mask = np.zeros((size, size), np.float32)
    for box, value in ((weak, 0.5), (strong, 1.0)):
        x0, y0, x1, y1 = box
        mask[y0:y1, x0:x1] = value
    return mask


def test_every_contour_gets_its_own_box():
    binary = np.zeros((10, 10), bool)
    binary[0:2, 0:3] = True
    binary[5:9, 6:8] = True
    binary[2, 3] = True  # touches the first blob at a corner: 8-connected, the same contour
    # boundingRect (x, y, w, h) as [x, y, x + w, y + h]: [0, 0, 4, 3] and [6, 5, 8, 9].
    assert sorted(contour_boxes(binary)) == [[0, 0, 4, 3], [6, 5, 8, 9]]
    assert contour_boxes(np.zeros((4, 4), bool)) == [[0, 0, 0, 0]]  # theirs when no contour


def ring(size=12, outer=(1, 11), hole=(4, 8)):
    """A map of 1 on the square [outer) x [outer) but 0 on the square [hole) x [hole)."""
    mask = np.zeros((size, size), np.float32)
    mask[outer[0] : outer[1], outer[0] : outer[1]] = 1.0
    mask[hole[0] : hole[1], hole[0] : hole[1]] = 0.0
    return mask


def test_a_rings_hole_gives_a_box_too():
    """(a) RETR_TREE: the hole's border is a contour, with a box of its own."""
    # Outer border: pixels 1..10, [1, 1, 11, 11] (11 = W - 1: clipping leaves it). The hole is
    # pixels 4..7; its border runs on the lit pixels around it, 3..8: [3, 3, 9, 9].
    assert sorted(contour_boxes(ring() > 0)) == [[1, 1, 11, 11], [3, 3, 9, 9]]
    # An object that is the hole and its one-pixel rim, GT [3, 3, 9, 9]: the hole's box is it,
    # IoU 1. The outer box alone would give 7 * 7 / (11 * 11) = 0.405 (+1 convention), and
    # the old module's component box 6 * 6 / (10 * 10) = 0.36.
    assert best_ious(ring(), [[3, 3, 9, 9]], thresholds=(0.0, 0.5)) == pytest.approx([1.0, 1.0])
    # GT exactly the hole, [4, 4, 8, 8] (5 x 5 inclusive): with the hole's box (7 x 7)
    # 25 / 49 = 0.510, right at 0.3 and 0.5, not 0.7; the outer box gives 25 / 121.
    assert best_ious(ring(), [[4, 4, 8, 8]], thresholds=(0.5,)) == pytest.approx([25 / 49])
    meter = BoxAccMeter()
    meter.add(ring(), [[4, 4, 8, 8]])
    result = meter.result()
    assert (result["MaxBoxAcc@0.3"], result["MaxBoxAcc@0.5"], result["MaxBoxAcc@0.7"]) == (1, 1, 0)


def test_a_block_at_the_right_and_bottom_edges_is_clipped():
    """(b) x + w and y + h are clipped to W - 1 / H - 1, and IoU adds 1 to each side."""
    mask = np.zeros((10, 10), np.float32)
    mask[6:10, 6:10] = 1.0  # pixels 6..9: boundingRect (6, 6, 4, 4), x + w = 10 -> 9
    assert contour_boxes(mask > 0) == [[6, 6, 9, 9]]
    # Against the object's own box [6, 6, 10, 10]: 4 * 4 / (5 * 5) = 0.64, right at 0.3 and
    # 0.5, not 0.7 (the old module gave 1.0).
    assert best_ious(mask, [[6, 6, 10, 10]], thresholds=(0.5,)) == pytest.approx([0.64])
    # Away from the edges a mask that is exactly the box gives it back: IoU 1.
    mask = np.zeros((10, 10), np.float32)
    mask[4, 4] = 1.0  # one pixel: [4, 4, 5, 5]
    assert best_ious(mask, [[4, 4, 5, 5]], thresholds=(0.5,)) == pytest.approx([1.0])
    # Against a 2 x 2 object [4, 4, 6, 6]: 2 * 2 / (3 * 3) = 0.444 (the old module: 1 / 4).
    assert best_ious(mask, [[4, 4, 6, 6]], thresholds=(0.5,)) == pytest.approx([4 / 9])


def test_uint8_quantisation_decides_near_a_threshold():
    """(c) A pixel is kept where int(255 * s) > int(255 * t)."""
    mask = np.zeros((10, 10), np.float32)
    mask[2:6, 2:6] = 1.0  # the object, GT [2, 2, 6, 6]; the map's max: normalising keeps 0.501
    mask[2:6, 6:8] = 0.501  # a halo beside it, above 0.5 by less than 1/255
    # At t = 0.5: int(127.5) = 127, and the halo's int(0.501 * 255) = int(127.755) = 127:
    # 127 > 127 fails, the halo is dropped (though 0.501 > 0.5) and the box is the object's,
    # IoU 1. At t = 0.49: int(124.95) = 124 < 127, the halo is kept: box [2, 2, 8, 6],
    # 5 * 5 / (7 * 5) = 0.714.
    ious = best_ious(mask, [[2, 2, 6, 6]], thresholds=(0.49, 0.5))
    assert ious == pytest.approx([25 / 35, 1.0])
    mask[2:6, 6:8] = 0.502  # int(128.01) = 128 > 127: kept at 0.5 too
    assert best_ious(mask, [[2, 2, 6, 6]], thresholds=(0.5,)) == pytest.approx([25 / 35])


def test_the_threshold_grid_is_theirs():
    assert tuple(np.arange(0, 1, 0.01)) == THRESHOLDS  # np.arange(0, 1, cam_curve_interval)
    assert len(THRESHOLDS) == 100 and THRESHOLDS[0] == 0.0 and THRESHOLDS[-1] == 0.99
    quantized = quantize(normalize(np.arange(4.0)[None]))  # 0, 1/3, 2/3, 1 -> 0, 85, 170, 255
    assert quantized.tolist() == [[0, 85, 170, 255]]
    # int(t * 255): 0.5 -> 127, 0.99 -> int(252.45) = 252
    assert levels(quantized, (0.0, 0.5, 0.99)).tolist() == [0, 127, 252]


def test_a_constant_map_normalises_to_zeros_and_has_their_empty_box():
    """(d) A constant map (or one with a NaN) becomes zeros, which keep no pixel: theirs then
    gives the one box [0, 0, 0, 0], an inclusive box of the top-left pixel."""
    assert not normalize(np.full((6, 6), 0.7)).any()
    with_nan = np.ones((6, 6))
    with_nan[0, 0] = np.nan
    assert not normalize(with_nan).any()
    # Away from the corner it meets no box: IoU 0 at every threshold, never right.
    assert not best_ious(np.full((6, 6), 0.7), [[2, 2, 5, 5]]).any()
    # At the corner it counts as one pixel: against [0, 0, 3, 3] (4 x 4 inclusive), 1 / 16.
    assert best_ious(np.full((6, 6), 0.7), [[0, 0, 3, 3]]) == pytest.approx(np.full(100, 1 / 16))


def test_the_best_iou_at_each_threshold():
    # strong half on the box (255), weak half beside it (int(127.5) = 127). Up to t = 0.49
    # (level 124) both are kept: one box [0, 0, 8, 4], 5 * 5 / (9 * 5) = 5 / 9 with the GT
    # [0, 0, 4, 4]. From t = 0.5 (level 127) only the strong half: IoU 1.
    mask = two_level(strong=(0, 0, 4, 4), weak=(4, 0, 8, 4))
    ious = best_ious(mask, [[0, 0, 4, 4]], thresholds=(0.0, 0.49, 0.5, 0.9))
    assert ious == pytest.approx([5 / 9, 5 / 9, 1.0, 1.0])


def test_a_distant_blob_does_not_spoil_the_objects_box():
    mask = two_level(strong=(0, 0, 4, 4), weak=(6, 6, 10, 10))
    assert best_ious(mask, [[0, 0, 4, 4]], thresholds=(0.1,)) == pytest.approx([1.0])


def test_maxboxacc_takes_one_threshold_for_all_images():
    meter = BoxAccMeter()
    # A: IoU 5/9 below threshold 0.5 and 1 from it; C (its box is the wide one): 1 below it,
    # then 5 * 5 / (9 * 5) = 5/9. Right at 0.7 only above / below 0.5.
    meter.add(two_level(strong=(0, 0, 4, 4), weak=(4, 0, 8, 4)), [[0, 0, 4, 4]])
    meter.add(two_level(strong=(0, 0, 4, 4), weak=(4, 0, 8, 4)), [[0, 0, 8, 4]])
    result = meter.result()
    assert result["MaxBoxAcc@0.3"] == 1.0 and result["MaxBoxAcc@0.5"] == 1.0
    assert result["MaxBoxAcc@0.7"] == 0.5  # each image alone could reach 1 at its own threshold
    assert result["best_threshold@0.7"] == 0.0  # ties go to the lowest threshold
    assert result["MaxBoxAccV2"] == pytest.approx((1 + 1 + 0.5) / 3)


def test_an_image_that_is_never_right_counts_against_every_threshold():
    meter = BoxAccMeter()
    meter.add(two_level(strong=(0, 0, 4, 4), weak=(0, 0, 4, 4)), [[0, 0, 4, 4]])
    # zeros: the box [0, 0, 0, 0], IoU 1 / 25 with [0, 0, 4, 4]: never right
    meter.add(np.zeros((10, 10)), [[0, 0, 4, 4]])
    assert meter.result()["MaxBoxAccV2"] == pytest.approx(0.5)
    empty = BoxAccMeter().result()  # no image: nothing to report (and valid JSON)
    assert empty["MaxBoxAccV2"] is None and empty["MaxBoxAcc@0.5"] is None


def test_inverted_ground_truth_boxes_are_refused():
    with pytest.raises(ValueError, match="x0 <= x1"):
        best_ious(np.eye(4), [[3, 0, 1, 2]])


# A minimal transcription of the authors' code (wsolevaluation: inference.py
# `normalize_scoremap`; evaluation.py `compute_bboxes_from_scoremaps` with
# multi_contour_eval=True, `calculate_multiple_iou`, `BoxEvaluator.accumulate` / `compute`).


def their_normalize(cam):
    cam = np.array(cam, dtype=np.float64)
    if np.isnan(cam).any() or cam.min() == cam.max():
        return np.zeros_like(cam)
    cam -= cam.min()
    cam /= cam.max()
    return cam


def their_boxes(scoremap, thresholds):
    height, width = scoremap.shape
    image = np.expand_dims((scoremap * 255).astype(np.uint8), 2)
    boxes = []
    for threshold in thresholds:
        _, binary = cv2.threshold(image, int(threshold * np.max(image)), 255, cv2.THRESH_BINARY)
        contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
        if len(contours) == 0:
            boxes.append(np.asarray([[0, 0, 0, 0]]))
            continue
        found = []
        for contour in contours:
            x, y, w, h = cv2.boundingRect(contour)
            found.append([x, y, min(x + w, width - 1), min(y + h, height - 1)])
        boxes.append(np.asarray(found))
    return boxes


def their_ious(box_a, box_b):
    a, b = box_a[:, None], box_b[None]
    inter = np.maximum(0, np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1)
    inter *= np.maximum(0, np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1)
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    denominator = area_a + area_b - inter
    degenerate = denominator <= 0
    denominator[degenerate] = 1
    ious = inter / denominator
    ious[degenerate] = 0
    return ious


def their_best_ious(mask, gt_boxes):
    thresholds = list(np.arange(0, 1, 0.01))
    boxes = their_boxes(their_normalize(mask), thresholds)
    return np.array([their_ious(b, np.array(gt_boxes)).max() for b in boxes])


def random_maps(rng, height=32, width=24):
    """Noise; nearest-upsampled blocks (traced on the small grid); smooth; sparse blobs with
    holes; each a few times."""
    for _ in range(3):
        yield rng.random((height, width))
        yield cv2.resize(rng.random((8, 6)), (width, height), interpolation=cv2.INTER_NEAREST)
        yield cv2.resize(rng.random((3, 3)), (width, height), interpolation=cv2.INTER_LINEAR)
        sparse = rng.random((8, 6)) * (rng.random((8, 6)) > 0.4)
        yield np.kron(sparse, np.ones((4, 4)))


def test_agrees_with_a_transcription_of_the_authors_code():
    rng = np.random.default_rng(0)
    gt_boxes = [[2, 3, 20, 17], [10, 0, 24, 9]]
    meter, theirs = BoxAccMeter(), np.zeros((100, 3))
    for mask in random_maps(rng):
        expected = their_best_ious(mask, gt_boxes)
        assert np.array_equal(best_ious(mask, gt_boxes), expected)  # exactly, not approx
        meter.add(mask, gt_boxes)
        theirs += expected[:, None] >= np.array([30, 50, 70])[None] / 100
    result = meter.result()
    their_max = (theirs * 100.0 / meter.n).max(axis=0)  # BoxEvaluator.compute, in percent
    for delta, value in zip((0.3, 0.5, 0.7), their_max, strict=True):
        assert result[f"MaxBoxAcc@{delta}"] * 100 == pytest.approx(value)
    assert result["MaxBoxAccV2"] * 100 == pytest.approx(np.average(their_max))


def test_tile_boxes_of_stacked_binaries_and_on_a_smaller_grid():
    tiles = np.zeros((3, 6, 8), bool)
    tiles[0, 1:3, 2:7] = True  # one component: [2, 1, 7, 3]
    tiles[1, 0:2, 0:2] = tiles[1, 4:6, 5:8] = True  # two; the second clipped to [5, 4, 7, 5]
    tiles[2, 0:5, 0:5] = True
    tiles[2, 2, 2] = False  # a one-pixel hole at (2, 2): its box [1, 1, 4, 4]
    tile, boxes = tile_boxes(tiles)
    found = sorted(zip(tile.tolist(), boxes.tolist(), strict=True))
    assert found == [
        (0, [2, 1, 7, 3]),
        (1, [0, 0, 2, 2]),
        (1, [5, 4, 7, 5]),
        (2, [0, 0, 5, 5]),
        (2, [1, 1, 4, 4]),
    ]
    # On a 4 times smaller grid, the same boxes as tracing the full grid: the outer box
    # scaled, the hole's (pixels 8..11) grown by one full pixel: [7, 7, 13, 13].
    _, small = tile_boxes(tiles[2:], k=4)
    full = np.kron(tiles[2], np.ones((4, 4), bool))
    assert sorted(small.tolist()) == sorted(contour_boxes(full)) == [[0, 0, 20, 20], [7, 7, 13, 13]]


def test_block_size_and_box_ious():
    mask = np.kron(np.arange(6.0).reshape(2, 3), np.ones((4, 4)))  # 4 x 4 blocks
    assert block_size(mask) == 4
    mask[0, 0] = 0.5  # one pixel breaks the blocks
    assert block_size(mask) == 1
    # Their own test's values: [1, 2, 5, 6] (5 x 5) and [3, 1, 4, 5] (2 x 5) overlap on
    # x 3..4, y 2..5: 8 / (25 + 10 - 8) = 8 / 27. Two [0, 0, 0, 0] are the same pixel: 1.
    boxes = np.array([[1, 2, 5, 6], [0, 0, 0, 0]])
    gt = np.array([[3, 1, 4, 5], [0, 0, 0, 0]])
    assert box_ious(boxes, gt) == pytest.approx(np.array([[8 / 27, 0.0], [0.0, 1.0]]))
