"""MaxBoxAccV2 on hand-built masks whose boxes and IoUs are known."""

import cv2
import numpy as np
import pytest

from casm_deploy.evaluation.boxacc import (
    THRESHOLDS,
    BoxAccMeter,
    best_ious,
    block_size,
    box_ious,
    component_boxes,
    normalize,
    tile_boxes,
)
from casm_deploy.evaluation.metrics import box_iou


def two_level(strong, weak, size=10):
    """A mask of 1.0 over the box `strong` and 0.5 over the box `weak` (x0, y0, x1, y1)."""
    mask = np.zeros((size, size), np.float32)
    for box, value in ((weak, 0.5), (strong, 1.0)):
        x0, y0, x1, y1 = box
        mask[y0:y1, x0:x1] = value
    return mask


def test_every_component_gets_its_own_box():
    binary = np.zeros((10, 10), bool)
    binary[0:2, 0:3] = True
    binary[5:9, 6:8] = True
    binary[2, 3] = True  # touches the first blob at a corner: 8-connected, the same component
    assert sorted(component_boxes(binary)) == [[0, 0, 4, 3], [6, 5, 8, 9]]
    assert component_boxes(np.zeros((4, 4), bool)) == []


def test_a_constant_mask_normalises_to_zeros_and_finds_no_box():
    assert not normalize(np.full((6, 6), 0.7)).any()
    assert not best_ious(np.full((6, 6), 0.7), [[0, 0, 3, 3]]).any()


def test_the_best_iou_at_each_threshold():
    # strong half on the box, weak half beside it: below 0.5 one component [0, 0, 8, 4]
    mask = two_level(strong=(0, 0, 4, 4), weak=(4, 0, 8, 4))
    ious = best_ious(mask, [[0, 0, 4, 4]], thresholds=(0.0, 0.49, 0.5, 0.9))
    assert ious == pytest.approx([0.5, 0.5, 1.0, 1.0])


def test_a_distant_blob_does_not_spoil_the_objects_box():
    mask = two_level(strong=(0, 0, 4, 4), weak=(6, 6, 10, 10))
    assert best_ious(mask, [[0, 0, 4, 4]], thresholds=(0.1,)) == pytest.approx([1.0])


def test_maxboxacc_takes_one_threshold_for_all_images():
    meter = BoxAccMeter()
    # A: right at 0.7 only above threshold 0.5; C: only below it (its box is the wide one)
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
    meter.add(np.zeros((10, 10)), [[0, 0, 4, 4]])
    assert meter.result()["MaxBoxAccV2"] == pytest.approx(0.5)
    empty = BoxAccMeter().result()  # no image: nothing to report (and valid JSON)
    assert empty["MaxBoxAccV2"] is None and empty["MaxBoxAcc@0.5"] is None


def one_threshold_at_a_time(mask, gt_boxes):
    """The definition, slowly: label each threshold's binary on its own."""
    scores = normalize(mask)
    return np.array(
        [
            max((box_iou(b, g) for b in component_boxes(scores > t) for g in gt_boxes), default=0)
            for t in THRESHOLDS
        ]
    )


@pytest.mark.parametrize(
    "grid, interpolation, blocks",
    [
        ((32, 24), cv2.INTER_NEAREST, 1),  # noise: several components at most thresholds
        ((8, 6), cv2.INTER_NEAREST, 4),  # 4 x 4 blocks: labelled on the 8 x 6 grid
        ((2, 2), cv2.INTER_LINEAR, 1),  # smooth: one component at most thresholds
    ],
)
def test_one_labelling_pass_gives_each_thresholds_own_ious(grid, interpolation, blocks):
    rng = np.random.default_rng(blocks)
    gt_boxes = [[2, 3, 20, 17], [10, 0, 32, 9]]
    for _ in range(3):
        small = rng.random(grid).astype(np.float32)
        mask = cv2.resize(small, (24, 32), interpolation=interpolation)  # (32, 24)
        assert block_size(normalize(mask)) == blocks
        assert best_ious(mask, gt_boxes) == pytest.approx(one_threshold_at_a_time(mask, gt_boxes))


def test_tile_boxes_of_binaries_of_one_and_of_several_components():
    tiles = np.zeros((3, 6, 8), bool)
    tiles[0, 1:3, 2:7] = True  # one component
    tiles[1, 0:2, 0:2] = tiles[1, 4:6, 5:8] = True  # two
    tiles[2, 2, 3] = tiles[2, 3, 4] = True  # one: diagonal neighbours are 8-connected
    tile, boxes = tile_boxes(tiles)
    found = sorted(zip(tile.tolist(), boxes.tolist(), strict=True))
    assert found == [(0, [2, 1, 7, 3]), (1, [0, 0, 2, 2]), (1, [5, 4, 8, 6]), (2, [3, 2, 5, 4])]


def test_block_size_and_box_ious():
    mask = np.kron(np.arange(6.0).reshape(2, 3), np.ones((4, 4)))  # 4 x 4 blocks
    assert block_size(mask) == 4
    mask[0, 0] = 0.5  # one pixel breaks the blocks
    assert block_size(mask) == 1
    boxes = np.array([[0, 0, 4, 4], [2, 2, 6, 6], [3, 3, 3, 8]])
    gt = np.array([[0, 0, 4, 4], [0, 0, 8, 2]])
    expected = [[box_iou(b, g) for g in gt] for b in boxes]  # the last box is empty: IoU 0
    assert box_ious(boxes, gt) == pytest.approx(np.array(expected))
