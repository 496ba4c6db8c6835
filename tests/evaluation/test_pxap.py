"""PxAP on a few pixels whose precision-recall curve is worked out by hand."""

import numpy as np
import pytest

from casm_deploy.evaluation.pxap import PxAPMeter, average_precision, score_histograms


def pxap(*pairs):
    meter = PxAPMeter()
    for mask, truth in pairs:
        meter.add(np.asarray(mask, np.float32), np.asarray(truth, bool))
    return meter.result()["PxAP"]


def test_four_pixels_by_hand():
    # Scores 1, .5, .5, 0 on object, background, object, background. Called object at >= 1:
    # the first pixel (precision 1, recall 1/2); at >= .5 (thresholds .01 to .5): three pixels,
    # two of them object (precision 2/3, recall 1); at >= 0: all (recall 1 already).
    mask, truth = [[1.0, 0.5], [0.5, 0.0]], [[1, 0], [1, 0]]
    assert pxap((mask, truth)) == pytest.approx(1 * 0.5 + 2 / 3 * 0.5)
    # Each image is min-max normalised first: .504 / .502 / .5, all in the bin [.5, .51) as they
    # are (the object share, 0.5, without it), are 1 / .5 / 0 again.
    assert pxap(([[0.504, 0.502], [0.502, 0.5]], truth)) == pytest.approx(5 / 6)


def test_pixels_are_pooled_over_the_split_not_averaged_over_images():
    right, wrong = ([[1.0, 0.0]], [[1, 0]]), ([[1.0, 0.0]], [[0, 1]])
    assert pxap(right) == 1.0  # alone: the object pixel first, precision 1 all along
    assert pxap(wrong) == pytest.approx(0.5)  # alone: recall only at >= 0, precision 1/2
    # Together, at >= 1 one right and one wrong pixel (precision 1/2, recall 1/2), then at >= 0
    # all four (precision 1/2, recall 1): 0.5, not the mean of 1 and 0.5.
    assert pxap(right, wrong) == pytest.approx(0.5 * 0.5 + 0.5 * 0.5)


def test_a_constant_mask_scores_the_object_share():
    # Normalised to zeros, it calls every pixel object at threshold 0 only.
    assert pxap((np.full((2, 2), 0.3), [[0, 1], [0, 0]])) == pytest.approx(0.25)


def test_no_object_pixel_no_pxap_and_sizes_must_agree():
    assert pxap(([[1.0, 0.0]], [[0, 0]])) is None
    assert PxAPMeter().result() == {"PxAP": None}
    assert average_precision(np.zeros(102), np.ones(102)) is None
    with pytest.raises(ValueError, match="differ in size"):
        score_histograms(np.zeros((2, 2)), np.zeros((2, 3), bool))


def test_histogram_bins_are_the_authors():
    # Bins [0, .01), ..., [.99, 1), [1, 2), [2, 3]: a score of exactly 1 lands in [1, 2).
    objects, background = score_histograms(np.array([[1.0, 0.505, 0.0]]), [[True, True, False]])
    assert len(objects) == 102
    assert np.flatnonzero(objects).tolist() == [50, 100] and objects.sum() == 2
    assert np.flatnonzero(background).tolist() == [0]
