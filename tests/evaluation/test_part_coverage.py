"""Part coverage (issue 15): how a mask covers the parts of an object, any one of which tells
the class (`data synth --parts`): coverage.part_coverage, the label-map transform, the
parts/ sidecar reader, and eval's part_* scores."""

import dataclasses
import json
import shutil

import cv2
import numpy as np
import pytest
import torch

from casm_deploy.config import EvalConfig
from casm_deploy.data.imagenet import read_annotation, read_parts, transform_box
from casm_deploy.data.transforms import transform_labels
from casm_deploy.errors import UserError
from casm_deploy.evaluation import benchmark as evaluate
from casm_deploy.evaluation.benchmark import score_batch
from casm_deploy.evaluation.coverage import part_coverage
from casm_deploy.evaluation.methods import Method, choose_meters
from casm_deploy.evaluation.metrics import binarize_at_mean

KEYS = {"LE", "OM", "F1", "F1a", "mask_mean", "mask_std", "mask_entropy", "mask_tv", "n_images"}
KEYS |= {"MaxBoxAccV2", "MaxBoxAcc@0.3", "MaxBoxAcc@0.5", "MaxBoxAcc@0.7", "ms_per_image"}
PART_KEYS = {"part_coverage", "parts_all_touched", "part_share_least", "n_part_images"}


def three_parts() -> np.ndarray:
    """A 12 x 12 label map: parts 0, 1, 2 (labels 1, 2, 3) are 4 x 4 blocks in a row."""
    labels = np.zeros((12, 12), np.uint8)
    for k in range(3):
        labels[4:8, 4 * k : 4 * k + 4] = k + 1
    return labels


def test_a_mask_over_two_of_three_parts():
    mask = np.zeros((12, 12))
    mask[4:8, 0:8] = 1.0  # parts 0 and 1
    coverage = part_coverage(mask, three_parts())
    assert coverage.touched == pytest.approx(2 / 3) and not coverage.all_touched
    assert coverage.share_least == 0.0 and coverage.n_parts == 3


def test_mass_split_unevenly_and_evenly():
    labels = three_parts()
    mask = np.zeros((12, 12))
    mask[4:8, 0:4], mask[4:8, 4:8] = 0.7, 0.3  # mass 0.7 / 0.3 / 0
    assert part_coverage(mask, labels).share_least == 0.0
    mask[4:8, 8:12] = 0.2  # 0.7 / 0.3 / 0.2 of 1.2
    assert part_coverage(mask, labels).share_least == pytest.approx(0.2 / 1.2)
    # All three alike: touched, and a third of the mass each. Mass off the parts counts nowhere.
    even = np.zeros((12, 12))
    even[4:8, :] = 0.8
    even[0:2, :] = 0.5
    coverage = part_coverage(even, labels)
    assert coverage.touched == 1.0 and coverage.all_touched
    assert coverage.share_least == pytest.approx(1 / 3)


def test_parts_of_different_sizes_weigh_alike():
    # A large part (64 px) and a small one (4 px), both fully under a mask of ones: by mass
    # the small one would get 4/68 of it; by the mean over each part's pixels, half.
    labels = np.zeros((12, 12), np.uint8)
    labels[0:8, 0:8] = 1
    labels[10:12, 10:12] = 2
    coverage = part_coverage(np.ones((12, 12)), labels)
    assert coverage.share_least == pytest.approx(0.5) and coverage.all_touched


def test_touching_uses_the_binarised_mask_before_the_largest_component():
    labels = three_parts()
    mask = np.zeros((12, 12))
    mask[4:8, 0:4] = 1.0
    mask[4:8, 8:12] = 1.0  # two disjoint blobs: the largest component would keep one
    mask[4:8, 4:8] = 0.1  # below the mean (about 0.24): mass, but no pixel of the binary mask
    binary = binarize_at_mean(mask)
    assert not binary[4:8, 4:8].any() and binary[4:8, 0:4].all() and binary[4:8, 8:12].all()
    coverage = part_coverage(torch.from_numpy(mask)[None], labels)  # (1,H,W) tensor accepted
    assert coverage.touched == pytest.approx(2 / 3) and not coverage.all_touched
    assert coverage.share_least == pytest.approx(1.6 / (16 + 1.6 + 16))
    # One binary pixel inside a part touches it.
    mask[5, 5] = 1.0
    assert part_coverage(mask, labels).all_touched


def test_parts_outside_the_frame_are_left_out():
    labels = three_parts()
    labels[labels == 2] = 0  # part 1 cut away: parts 0 and 2 count
    mask = np.zeros((12, 12))
    mask[4:8, 0:4] = 1.0
    coverage = part_coverage(mask, labels)
    assert coverage.n_parts == 2 and coverage.touched == 0.5
    single = np.where(labels == 1, 1, 0)  # one part: all its mass on it
    assert part_coverage(mask, single).share_least == 1.0
    assert part_coverage(mask, np.zeros((12, 12), np.uint8)) is None
    # A zero mask touches nothing and shares nothing.
    assert part_coverage(np.zeros((12, 12)), three_parts())[:3] == (0.0, False, 0.0)
    with pytest.raises(ValueError, match="shape"):
        part_coverage(mask, labels[:6])
    with pytest.raises(ValueError, match="non-negative"):
        part_coverage(mask, -labels.astype(int))


def wide_labels() -> np.ndarray:
    """A 40 x 120 label map with a part at the left edge, one in the middle, one at the right."""
    labels = np.zeros((40, 120), np.uint8)
    labels[10:30, 0:20] = 1
    labels[10:30, 40:80] = 2
    labels[10:30, 100:120] = 3
    return labels


def test_center_crop_cuts_side_parts_away_and_stretch_keeps_them():
    labels = wide_labels()
    cropped = transform_labels(labels, 20, "center-crop")
    assert cropped.shape == (20, 20) and set(np.unique(cropped)) == {0, 2}
    # The kept part lands where its box goes (transform_box, which mirrors the image).
    ys, xs = np.nonzero(cropped == 2)
    box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
    assert box == transform_box([40, 10, 80, 30], 120, 40, 20, "center-crop")
    stretched = transform_labels(labels, 24, "stretch")
    assert stretched.shape == (24, 24) and set(np.unique(stretched)) == {0, 1, 2, 3}
    ys, xs = np.nonzero(stretched == 3)
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (20, 24, 6, 18)
    # random-resized-crop runs validate on the centre crop, as their images do.
    assert np.array_equal(transform_labels(labels, 20, "random-resized-crop"), cropped)


def test_label_maps_are_resampled_nearest_neighbour():
    """Area or linear resizing would mix labels 1 and 3 into a 2 at their border."""
    labels = np.zeros((30, 30), np.uint8)
    labels[:, :15] = 1
    labels[:, 15:] = 3
    for policy in ("center-crop", "stretch"):
        for size in (7, 13, 64):
            assert set(np.unique(transform_labels(labels, size, policy))) == {1, 3}


def write_sidecar(parts, stem: str, labels: np.ndarray, boxes: list) -> None:
    parts.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(parts / f"{stem}.png"), labels)
    entries = [{"name": f"part{k}", "box": box} for k, box in enumerate(boxes)]
    (parts / f"{stem}.json").write_text(json.dumps({"parts": entries, "favourite": 0}))


def test_read_parts_and_its_one_line_errors(tmp_path):
    parts = tmp_path / "parts"
    labels = wide_labels()
    boxes = [[0, 10, 20, 30], [40, 10, 80, 30], [100, 10, 120, 30]]
    write_sidecar(parts, "a", labels, boxes)
    assert np.array_equal(read_parts(parts, "a", 120, 40), labels)

    with pytest.raises(UserError, match=r"parts/b\.json: part annotation not found"):
        read_parts(parts, "b", 120, 40)
    with pytest.raises(UserError, match=r"a\.png: the label map is 120x40, its image 100x40"):
        read_parts(parts, "a", 100, 40)
    write_sidecar(parts, "c", labels, boxes[:2])
    with pytest.raises(UserError, match=r"c\.png: has label 3, but c\.json lists 2 parts"):
        read_parts(parts, "c", 120, 40)
    write_sidecar(parts, "d", np.dstack([labels] * 3), boxes)
    with pytest.raises(UserError, match=r"d\.png: not a one-channel uint8 label map"):
        read_parts(parts, "d", 120, 40)
    (parts / "a.png").unlink()
    with pytest.raises(UserError, match=r"a\.png: part label map not found"):
        read_parts(parts, "a", 120, 40)
    for text in ("{", '{"parts": []}', '{"parts": [{"name": "x"}]}', '{"parts": [3]}', "[]"):
        (parts / "f.json").write_text(text)
        with pytest.raises(UserError, match=r"f\.json: not a valid part annotation"):
            read_parts(parts, "f", 120, 40)


def test_score_batch_counts_only_images_with_parts_in_the_frame():
    masks = torch.zeros(2, 1, 12, 12)
    masks[:, 0, 4:8, 0:8] = 1.0  # parts 0 and 1 of three
    maps = [three_parts(), np.zeros((12, 12), np.uint8)]  # the second: every part cut away
    method = Method("m", None, labels=[0], meters=choose_meters(parts=True))
    score_batch(method, masks, torch.zeros(2, 1), torch.tensor([0, 0]), [[[0, 0, 6, 6]]] * 2, maps)
    result = method.result()
    assert result["n_images"] == 2 and result["n_part_images"] == 1
    assert result["part_coverage"] == pytest.approx(2 / 3)
    assert result["parts_all_touched"] == 0.0 and result["part_share_least"] == 0.0
    assert set(Method("m", None, labels=[0]).result()) == KEYS  # no parts: no part keys


@pytest.fixture
def parts_data(tiny_data, tmp_path):
    """tiny_data with parts/: each val object's box split into a left and a right part."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    for image in sorted((data / "val").glob("*/*.JPEG")):
        annotation = read_annotation(data / "annotations" / f"{image.stem}.xml")
        x0, y0, x1, y1 = (int(v) for v in annotation.boxes_of(image.parent.name)[0])
        middle = (x0 + x1) // 2
        labels = np.zeros((annotation.height, annotation.width), np.uint8)
        labels[y0:y1, x0:middle] = 1
        labels[y0:y1, middle:x1] = 2
        write_sidecar(
            data / "parts", image.stem, labels, [[x0, y0, middle, y1], [middle, y0, x1, y1]]
        )
    return data


def test_eval_scores_part_coverage_when_data_has_parts(
    parts_data, tmp_path, make_checkpoint, capsys
):
    model = make_checkpoint(tmp_path / "m" / "checkpoint.pt", parts_data)
    out = tmp_path / "scores.json"
    cfg = EvalConfig(
        models=(model,), data=str(parts_data), baselines=("full",), workers=0, json=str(out)
    )
    result = evaluate.run(cfg)
    printed = " ".join(capsys.readouterr().out.split())
    assert "parts: also scoring part coverage (part_coverage, parts_all_touched," in printed
    # Table columns, all of them whole in the 120 columns of a log.
    assert {"entropy", "parts", "all", "least", "part", "images"} <= set(printed.split())
    written = json.loads(out.read_text())
    assert set(written) == KEYS | PART_KEYS | {"PxAP"}  # tiny_data has object masks
    assert written["n_part_images"] == 12 == written["n_images"]
    assert 0 <= written["part_coverage"] <= 1 and 0 <= written["parts_all_touched"] <= 1
    assert 0 <= written["part_share_least"] <= 0.5
    full = result["scores"]["full"]  # a mask of ones touches both halves, about equally
    assert full["part_coverage"] == 1.0 and full["parts_all_touched"] == 1.0
    assert full["part_share_least"] == pytest.approx(0.5, abs=0.06)
    assert set(json.loads((tmp_path / "scores.full.json").read_text())) == (
        KEYS | PART_KEYS | {"PxAP"}
    )
    stretched = evaluate.run(dataclasses.replace(cfg, resize="stretch", json=""))["scores"]
    assert stretched["full"]["part_coverage"] == 1.0

    # Every scored image needs its sidecar: a missing one is a one-line error naming it.
    missing = sorted((parts_data / "parts").glob("*.png"))[0]
    missing.unlink()
    with pytest.raises(UserError, match=f"{missing.name}: part label map not found"):
        evaluate.run(dataclasses.replace(cfg, json=""))
