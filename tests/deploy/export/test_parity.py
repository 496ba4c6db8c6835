"""Parity: a model equal to the eager fp32 one passes; a perturbed one fails, its figures named.

`parity.check` is driven by numpy predict functions built on a tiny random mapping at 64 px;
`parity.check_parity` by its exported ONNX file, against itself and against another model.
"""

import dataclasses
import re

import numpy as np
import pytest
import torch

from casm_deploy.checkpoint import load_masker
from casm_deploy.deploy.export import parity
from casm_deploy.deploy.export.parity import check_parity

SIZE = 64
N = 8  # parity images: enough for every batch size to split them differently (1, 3, 64)


@pytest.fixture(scope="module")
def files(make_exports, tiny_data, tmp_path_factory):
    return make_exports(tmp_path_factory.mktemp("parity"), tiny_data, SIZE, formats=("onnx",))


@pytest.fixture(scope="module")
def masker(files):
    return load_masker(files["eager"])[0].eval()


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).random((N, 3, SIZE, SIZE), dtype=np.float32)


def _predict(masker) -> parity.Predict:
    def predict(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            masks, logits = masker(torch.from_numpy(batch))
        return masks.numpy(), logits.numpy()

    return predict


def test_a_model_equal_to_itself_passes(masker, images):
    predict = _predict(masker)
    ref = parity.reference(predict, images, n_real=N)
    result = parity.check(predict, images, ref, "fp32")
    assert result["status"] == "passed" and result["failures"] == []
    assert sorted(result["batches"]) == sorted(map(str, parity.BATCH_SIZES))
    worst = result["worst"]
    # the same model: only the batch size changes the kernels' summation order
    assert worst["max_abs_mask"] < 1e-4 and worst["max_abs_logits"] < 1e-3
    assert worst["boxes_identical"] == 1.0 and worst["argmax_agree"] == 1.0
    assert result["thresholds"] == dataclasses.asdict(parity.THRESHOLDS["fp32"])


def test_a_perturbed_model_fails_with_its_figures(masker, images):
    predict = _predict(masker)
    ref = parity.reference(predict, images, n_real=N)

    def shifted(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        masks, logits = predict(batch)
        return np.clip(masks + 0.01, 0, 1), logits

    result = parity.check(shifted, images, ref, "fp32")
    assert result["status"] == "failed"
    assert 0.0099 < result["worst"]["max_abs_mask"] < 0.0101
    # "batch 1, 3, 64: max |Δmask| 0.01 > 0.0001" (batch sizes whose figures differ: apart)
    batches = []
    for failure in result["failures"]:
        found = re.fullmatch(r"batch ([\d, ]+): max \|Δmask\| ([\d.e-]+) > 0\.0001", failure)
        assert found, failure
        assert 0.0099 < float(found[2]) < 0.0101
        batches += found[1].split(", ")
    assert sorted(batches, key=int) == ["1", "3", "64"]
    # at fp16's looser bars the same shift passes: the thresholds follow the precision
    assert parity.check(shifted, images, ref, "fp16")["status"] == "passed"

    def swapped(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        masks, logits = predict(batch)
        return masks, -logits  # the argmax moves on every image

    failures = parity.check(swapped, images, ref, "fp32")["failures"]
    assert failures == ["batch 1, 3, 64: argmax agrees on 0.0% of images, not all"]


def test_verdict_names_each_failed_criterion():
    stats = {
        "max_abs_mask": 0.5,
        "mean_abs_mask": 0.2,
        "boxes_identical": 0.5,
        "boxes_iou_above_0.9": 0.25,
        "argmax_agree": 1.0,
    }
    assert parity.verdict(stats, parity.THRESHOLDS["int8"]) == [
        "mean |Δmask| 0.2 > 0.03",
        "box IoU > 0.9 on 25.0% of real images < 95%",
    ]
    assert parity.verdict(stats, parity.THRESHOLDS["fp32"]) == [
        "max |Δmask| 0.5 > 0.0001",
        "identical boxes on 50.0% of real images < 99%",
    ]


def test_check_parity_of_an_exported_file(files, masker, images, make_checkpoint, tiny_data):
    written = {"onnx": {"path": files["onnx"], "precision": "fp32"}}
    source = {"data": "random", "val": 0, "train": 0, "random": N, "real": N}
    cpu = torch.device("cpu")
    report = check_parity(masker, written, images, source, cpu)
    assert report["passed"] and report["verdict"] == "passed"
    assert report["reference"] == "eager fp32 on cpu" and report["images"] == source
    (result,) = report["results"]
    assert result["backend"] == "onnxruntime CPU" and result["status"] == "passed"
    assert result["worst"]["max_abs_mask"] < 1e-4

    other_path = make_checkpoint(files["eager"].parent / "other.pt", tiny_data, SIZE, seed=1)
    other = load_masker(other_path)[0].eval()  # other weights: the file is not its export
    report = check_parity(other, written, images, source, cpu)
    assert not report["passed"] and report["verdict"] == "failed"
    (result,) = report["results"]
    assert result["status"] == "failed"
    assert any("max |Δmask|" in failure for failure in result["failures"])
