"""MaxBoxAccV2 on hand-built masks whose boxes and IoUs are known."""

import math

import numpy as np
import pytest

from casm_deploy.evaluation.boxacc import BoxAccMeter, best_ious, component_boxes, normalize


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
    assert math.isnan(BoxAccMeter().result()["MaxBoxAccV2"])
