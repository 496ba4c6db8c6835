"""casm_deploy.evaluation.metrics: hand-computed cases and the reference's binarisation rule."""

import math

import numpy as np
import pytest
import torch

from casm_deploy.evaluation.coverage import copy_coverage
from casm_deploy.evaluation.metrics import (
    LocalizationMeter,
    MaskStats,
    binarize_at_mean,
    box_area,
    box_iou,
    center_box,
    clip_box,
    largest_component,
    localization_scores,
    mask_entropy,
    mask_to_box,
    masks_to_boxes,
    total_variation,
)

EPS = 1e-6  # the reference's F1 epsilon


def reference_binarize(masks: torch.Tensor) -> torch.Tensor:
    """kondiz/casme `binarize_mask`, per image with torch.kthvalue, on (B,1,H,W).

    The mean is taken in float64 here (the reference's avg_pool2d sums in float32 in an
    unspecified order), the same as in our implementation.
    """
    b = masks.size(0)
    flat = masks.reshape(b, -1)
    avg = flat.double().mean(dim=1)
    out = torch.zeros_like(flat, dtype=torch.bool)
    for i in range(b):
        kth = 1 + int((flat[i].size(0) - 1) * (1 - avg[i].item()) + 0.5)
        th, _ = torch.kthvalue(flat[i], kth)
        th.clamp_(1e-6, 1 - 1e-6)
        out[i] = flat[i].gt(th)
    return out.reshape(b, *masks.shape[2:])


# --- binarisation ----------------------------------------------------------------------------


def test_empty_mask_keeps_nothing():
    masks = np.zeros((2, 8, 8), dtype=np.float32)
    assert not binarize_at_mean(masks).any()
    assert masks_to_boxes(masks) == [None, None]


def test_full_mask_keeps_everything():
    # mean 1 -> kth = 1 -> threshold = min = 1, clamped to 1 - 1e-6 -> every pixel is above it.
    masks = np.ones((1, 6, 9), dtype=np.float32)
    assert binarize_at_mean(masks).all()
    assert masks_to_boxes(masks) == [[0, 0, 9, 6]]


def test_full_mask_in_half_precision_tensor():
    # fp16 would round 1 - 1e-6 up to 1 and keep nothing; inputs are widened first.
    for dtype in (torch.float16, torch.bfloat16):
        masks = torch.ones(1, 1, 5, 5, dtype=dtype)
        assert binarize_at_mean(masks).all()


def test_graded_mask_hand_count():
    # values k/16, k = 0..15: mean = 7.5/16 = 0.46875 (exact in binary); n = 16;
    # kth = 1 + int(15 * 0.53125 + 0.5) = 1 + int(8.46875) = 9 -> threshold = 9th smallest = 8/16;
    # kept: values strictly above 8/16, i.e. k = 9..15 (7 pixels).
    mask = (np.arange(16, dtype=np.float32) / 16).reshape(4, 4)
    binary = binarize_at_mean(mask)
    assert binary.shape == (4, 4)
    np.testing.assert_array_equal(binary, np.arange(16).reshape(4, 4) > 8)
    assert binary.sum() == 7


def test_shapes_and_tensor_input():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 1, 7, 5)).astype(np.float32)
    assert binarize_at_mean(masks).shape == (3, 7, 5)
    assert binarize_at_mean(masks[:, 0]).shape == (3, 7, 5)
    np.testing.assert_array_equal(
        binarize_at_mean(torch.from_numpy(masks)), binarize_at_mean(masks[:, 0])
    )
    with pytest.raises(ValueError):
        binarize_at_mean(np.zeros((2, 3, 4, 4)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binarize_matches_reference_kthvalue(seed):
    gen = torch.Generator().manual_seed(seed)
    uniform = torch.rand(6, 1, 16, 24, generator=gen)
    # Smooth, saturated masks like a decoder's, and coarse values with many ties.
    blobs = torch.sigmoid(
        8 * torch.nn.functional.avg_pool2d(torch.randn(6, 1, 16, 24, generator=gen), 5, 1, 2)
    )
    quantised = torch.round(torch.rand(6, 1, 16, 24, generator=gen) * 4) / 4
    constants = torch.tensor([0.0, 0.3, 0.5, 1.0]).view(4, 1, 1, 1).expand(4, 1, 16, 24)
    for masks in (uniform, blobs, quantised, constants.contiguous()):
        expected = reference_binarize(masks).numpy()
        np.testing.assert_array_equal(binarize_at_mean(masks), expected)
        np.testing.assert_array_equal(binarize_at_mean(masks.numpy().astype(np.float64)), expected)


# --- components and boxes --------------------------------------------------------------------


def test_binary_square_gives_its_exact_box():
    mask = np.zeros((10, 12), dtype=np.float32)
    mask[2:6, 3:8] = 1  # rows 2..5, columns 3..7
    np.testing.assert_array_equal(binarize_at_mean(mask), mask > 0)
    assert masks_to_boxes(mask[None]) == [[3, 2, 8, 6]]
    assert masks_to_boxes(torch.from_numpy(mask)[None, None]) == [[3, 2, 8, 6]]


def test_two_blobs_larger_wins():
    mask = np.zeros((12, 12), dtype=np.float32)
    mask[1:3, 1:3] = 1  # 4 px
    mask[6:9, 5:8] = 1  # 9 px
    assert masks_to_boxes(mask[None]) == [[5, 6, 8, 9]]


def test_diagonal_pixels_are_not_connected():
    binary = np.zeros((6, 6), dtype=bool)
    binary[0, 0] = binary[1, 1] = binary[2, 2] = True  # 3 px, but only diagonally touching
    binary[4, 3:5] = True  # 2 px, 4-connected
    expected = np.zeros_like(binary)
    expected[4, 3:5] = True
    np.testing.assert_array_equal(largest_component(binary), expected)


def test_largest_component_tie_is_first_in_raster_order_and_empty_stays_empty():
    binary = np.zeros((5, 5), dtype=bool)
    binary[3, 0:2] = True
    binary[0, 3:5] = True  # same size, earlier in raster order
    assert mask_to_box(largest_component(binary)) == [3, 0, 5, 1]
    empty = np.zeros((4, 4), dtype=bool)
    assert not largest_component(empty).any()
    assert mask_to_box(empty) is None


def test_box_touching_both_borders():
    mask = np.zeros((8, 10), dtype=np.float32)
    mask[3:6, :] = 1  # touches x = 0 and x = W
    assert masks_to_boxes(mask[None]) == [[0, 3, 10, 6]]
    single = np.zeros((4, 4), dtype=bool)
    single[0, 0] = True
    assert mask_to_box(single) == [0, 0, 1, 1]
    single[:] = False
    single[3, 3] = True
    assert mask_to_box(single) == [3, 3, 4, 4]


def test_box_helpers():
    assert box_area([0, 0, 1, 1]) == 1
    assert box_area([2, 3, 6, 5]) == 8
    assert box_area([5, 0, 2, 4]) == 0
    assert clip_box([-3, 2, 12, 20], 10, 8) == [0, 2, 10, 8]
    assert center_box(224, 224) == [33, 33, 191, 191]
    assert center_box(64, 64) == [9, 9, 55, 55]  # round(33 / 224 * 64) = round(9.43) = 9


def test_box_iou():
    assert box_iou([1, 2, 5, 7], [1, 2, 5, 7]) == 1.0
    assert box_iou([0, 0, 2, 2], [3, 3, 5, 5]) == 0.0
    assert box_iou([0, 0, 2, 2], [2, 0, 4, 2]) == 0.0  # exclusive edges: touching is disjoint
    assert box_iou([0, 0, 4, 4], [2, 2, 6, 6]) == pytest.approx(4 / 28)
    assert box_iou([0, 0, 0, 4], [0, 0, 4, 4]) == 0.0
    assert box_iou(None, [0, 0, 4, 4]) == 0.0


# --- localisation scores ---------------------------------------------------------------------


def test_empty_mask_scores():
    mask = np.zeros((8, 8), dtype=np.float32)
    scores = localization_scores(mask, None, [[2, 2, 6, 6]])
    assert scores == {"hit": False, "f1": 0.0, "f1a": 0.0, "iou": 0.0}
    meter = LocalizationMeter()
    meter.update(scores["hit"], scores["f1"], scores["f1a"], correct=True)
    result = meter.result()
    assert result["LE"] == 1.0 and result["OM"] == 1.0 and result["F1"] == 0.0


def test_gt_box_outside_frame_uses_unclipped_area():
    mask = np.zeros((10, 10), dtype=np.float32)
    mask[:, 0:5] = 1  # 50 px, the predicted rectangle too
    pred = [0, 0, 5, 10]
    # gt [-5, 0, 5, 10]: unclipped area 100, clipped [0, 0, 5, 10]; intersection 50.
    # IoU = 50 / (50 + 100 - 50) = 0.5 -> not a hit (strictly above 0.5 is).
    # F1: P = 50 / (50 + 1e-6), R = 50 / 100.
    scores = localization_scores(mask, pred, [[-5, 0, 5, 10]])
    p, r = 50 / (50 + EPS), 0.5
    assert scores["iou"] == pytest.approx(0.5)
    assert scores["hit"] is False
    assert scores["f1"] == pytest.approx(2 * p * r / (p + r + EPS), rel=1e-12)
    assert scores["f1"] == pytest.approx(2 / 3, abs=1e-5)
    # gt [-2, 0, 5, 10]: unclipped area 70 -> IoU = 50 / 70 -> a hit.
    scores = localization_scores(mask, pred, [[-2, 0, 5, 10]])
    assert scores["iou"] == pytest.approx(50 / 70)
    assert scores["hit"] is True


def test_gt_box_clipped_to_nothing_scores_zero():
    mask = np.ones((10, 10), dtype=np.float32)
    scores = localization_scores(mask, [0, 0, 10, 10], [[12, 0, 15, 10]])
    assert scores == {"hit": False, "f1": 0.0, "f1a": 0.0, "iou": 0.0}


def test_several_gt_boxes_max_and_mean():
    mask = np.zeros((10, 10), dtype=np.float32)
    mask[:, 0:5] = 1
    scores = localization_scores(mask, [0, 0, 5, 10], [[0, 0, 5, 10], [5, 0, 10, 10]])
    f1_first = 2 * (50 / (50 + EPS)) * 1.0 / (50 / (50 + EPS) + 1.0 + EPS)
    assert scores["hit"] is True
    assert scores["iou"] == pytest.approx(1.0)
    assert scores["f1"] == pytest.approx(f1_first)
    assert scores["f1a"] == pytest.approx(f1_first / 2)  # the second box scores F1 = 0


def test_f1_of_continuous_mask_hand_computed():
    mask = np.array(
        [[1.0, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0.25, 0], [0, 0, 0, 0.25]], dtype=np.float32
    )
    # sum 3, inside [0,0,2,2] = 2.5 -> P = 5/6, R = 2.5/4 = 5/8 -> F1 = 2PR/(P+R) = 5/7.
    scores = localization_scores(mask, None, [[0, 0, 2, 2]])
    assert scores["f1"] == pytest.approx(5 / 7, abs=1e-5)
    assert scores["f1a"] == pytest.approx(5 / 7, abs=1e-5)
    assert scores["hit"] is False  # no predicted rectangle
    # A channel dim and a torch tensor are accepted; float gt coordinates are truncated.
    again = localization_scores(torch.from_numpy(mask)[None], None, [[0.0, 0.0, 2.0, 2.0]])
    assert again["f1"] == pytest.approx(scores["f1"])


def test_localization_scores_needs_gt_boxes():
    with pytest.raises(ValueError):
        localization_scores(np.zeros((4, 4)), None, [])


# --- two copies ------------------------------------------------------------------------------

COPY_BOXES = [[1, 2, 4, 6], [9, 2, 12, 6]]  # the same box in each half of an 8 x 16 frame


def test_copy_coverage_of_both_copies_equally():
    mask = np.zeros((8, 16))
    mask[2:6, 1:4] = 1.0
    mask[2:6, 9:12] = 1.0
    assert copy_coverage(mask, COPY_BOXES) == (0.5, True)


def test_copy_coverage_of_the_left_copy_only():
    mask = np.zeros((8, 16))
    mask[2:6, 1:4] = 1.0
    assert copy_coverage(mask, COPY_BOXES) == (0.0, False)


def test_copy_coverage_uneven_and_faint():
    mask = np.zeros((1, 8, 16))  # a leading channel is accepted
    mask[0, 2:6, 1:4] = 1.0
    mask[0, 2:4, 9:12] = 1.0  # half of the right copy
    share, both = copy_coverage(mask, COPY_BOXES)
    assert share == pytest.approx(6 / 18) and both
    # The binarisation keeps about the mask's mean share of pixels, the brightest: here
    # 11% of them, all in the left copy, so the faint right copy has mass but is not touched.
    mask[0, 2:6, 1:4] = 0.9
    mask[0, 2:6, 9:12] = 0.3
    share, both = copy_coverage(mask, COPY_BOXES)
    assert share == pytest.approx(0.3 / 1.2) and not both


def test_copy_coverage_of_a_zero_mask_and_bad_boxes():
    assert copy_coverage(np.zeros((8, 16)), COPY_BOXES) == (0.0, False)
    with pytest.raises(ValueError, match="two boxes"):
        copy_coverage(np.zeros((8, 16)), COPY_BOXES[:1])


# --- meters and statistics -------------------------------------------------------------------


def test_localization_meter_with_unknown_classes():
    meter = LocalizationMeter()
    meter.update(True, 0.8, 0.6, correct=True)
    meter.update(True, 0.7, 0.7, correct=False)
    meter.update(False, 0.2, 0.1, correct=None)
    meter.update(False, 0.0, 0.0)
    result = meter.result()
    assert result["n_images"] == 4
    assert result["LE"] == pytest.approx(0.5)
    assert result["F1"] == pytest.approx(1.7 / 4)
    assert result["F1a"] == pytest.approx(1.4 / 4)
    assert result["OM"] == pytest.approx(0.5)  # over the first two images only

    unknown = LocalizationMeter()
    unknown.update(True, 1.0, 1.0)
    assert unknown.result()["OM"] is None
    assert LocalizationMeter().result()["n_images"] == 0


def test_entropy_and_total_variation():
    assert mask_entropy(np.full((4, 4), 0.5)) == pytest.approx(0.5)
    assert mask_entropy(np.zeros((4, 4))) == 0.0
    assert mask_entropy(np.ones((1, 4, 4))) == 0.0
    half = np.full((4, 4), 0.5)
    half[:2] = 1.0  # half the pixels contribute 0.5, the others nothing -> 0.25 over ALL pixels
    assert mask_entropy(half) == pytest.approx(0.25)

    checkerboard = (np.indices((4, 4)).sum(axis=0) % 2).astype(np.float32)
    assert total_variation(checkerboard) == pytest.approx(2.0)  # 1 horizontally + 1 vertically
    stripes = np.tile([0.0, 1.0], (4, 2))  # columns alternate
    assert total_variation(stripes) == pytest.approx(1.0)
    assert total_variation(torch.zeros(1, 1, 4, 4)) == 0.0
    with pytest.raises(ValueError):
        total_variation(np.zeros((2, 4, 4)))


def test_mask_stats_hand_case():
    stats = MaskStats()
    stats.update(np.stack([np.zeros((4, 4)), np.ones((4, 4))]))
    stats.update(torch.full((1, 1, 4, 4), 0.5))
    result = stats.result()
    # per-image means [0, 1, 0.5]
    assert result["mask_mean"] == pytest.approx(0.5)
    assert result["mask_std"] == pytest.approx(math.sqrt(1 / 6))
    assert result["mask_entropy"] == pytest.approx(0.5 / 3)
    assert result["mask_tv"] == 0.0
    assert MaskStats().result()["mask_mean"] is None


def test_mask_stats_streaming_matches_all_at_once():
    rng = np.random.default_rng(3)
    masks = rng.random((11, 6, 7)) ** 3
    masks[0] = 0.0
    masks[1] = 1.0
    streamed = MaskStats()
    for start, stop in [(0, 1), (1, 5), (5, 11)]:
        streamed.update(masks[start:stop])
    result = streamed.result()
    means = masks.reshape(11, -1).mean(axis=1)
    assert result["mask_mean"] == pytest.approx(means.mean())
    assert result["mask_std"] == pytest.approx(means.std())  # population std over all images
    assert result["mask_entropy"] == pytest.approx(np.mean([mask_entropy(m) for m in masks]))
    assert result["mask_tv"] == pytest.approx(np.mean([total_variation(m) for m in masks]))
