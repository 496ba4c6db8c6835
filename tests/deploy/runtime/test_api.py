"""The Python API, `casm_deploy.Masker`: load, predict on arrays, tensors and files, describe,
boxes in the original image's pixels, and a bad input named in one line.

The model is a tiny random mapping at 64 px, as a checkpoint, a TorchScript and an ONNX file.
"""

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import casm_deploy
from casm_deploy.deploy.runtime.masker import Prediction, scale_box
from casm_deploy.evaluation.metrics import masks_to_boxes

SIZE = 64
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def files(make_exports, tiny_data, tmp_path_factory):
    return make_exports(tmp_path_factory.mktemp("api"), tiny_data, SIZE)


@pytest.fixture(scope="module")
def masker(files):
    return casm_deploy.Masker.load(files["onnx"], device="cpu")


def _pictures() -> list[np.ndarray]:
    """RGB uint8 pictures of different sizes, each a bright block on a dark ground."""
    rng = np.random.default_rng(0)
    pictures = []
    for height, width in ((48, 80), (64, 64), (120, 90)):
        image = np.full((height, width, 3), 40, np.uint8)
        y, x = rng.integers(0, height // 2), rng.integers(0, width // 2)
        image[y : y + height // 2, x : x + width // 2] = rng.integers(120, 255, 3)
        pictures.append(image)
    return pictures


def test_load_reads_the_models_description(masker, files, tiny_data):
    info = masker.info
    classes = (tiny_data / "classes.txt").read_text().split()
    assert (info.backend, info.device, info.precision) == ("onnx", "cpu", "fp32")
    assert masker.image_size == info.image_size == SIZE
    assert info.num_classes == 3 and list(info.wnids) == classes[::2]
    assert list(info.names) == classes[1::2]
    assert info.training_data == "synthetic"  # the tiny data's classes are `data synth`'s
    assert len(info.sha256) == 64 and info.path == str(files["onnx"])


def test_predict_on_arrays_gives_one_result_per_image_at_its_own_size(masker):
    pictures = _pictures()
    result = masker.predict(pictures)
    assert isinstance(result, Prediction) and len(result) == len(pictures)
    for picture, mask, box, label, name, index, score in zip(
        pictures,
        result.masks,
        result.boxes,
        result.labels,
        result.names,
        result.indices,
        result.scores,
        strict=True,
    ):
        height, width = picture.shape[:2]
        assert mask.shape == (height, width) and mask.dtype == np.float32
        assert 0 <= mask.min() <= mask.max() <= 1
        assert box is not None
        x0, y0, x1, y1 = box
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert masker.info.label(index) == (label, name)
        assert 0 < score <= 1
    one = masker.predict(pictures[0])  # one image, not in a list
    assert len(one) == 1 and one.boxes[0] == result.boxes[0]


def test_boxes_are_the_model_frame_boxes_scaled_to_the_original(masker):
    pictures = _pictures()
    original = masker.predict(pictures)
    model = masker.predict(pictures, mask_size="model")
    assert all(m.shape == (SIZE, SIZE) for m in model.masks)
    assert model.boxes == original.boxes  # the box does not depend on the returned mask size
    for picture, mask, box in zip(pictures, model.masks, original.boxes, strict=True):
        height, width = picture.shape[:2]
        (frame,) = masks_to_boxes(mask[None])
        assert box == scale_box(frame, SIZE, width, height)


def test_arrays_tensors_and_files_give_the_same_result(masker, tmp_path):
    pictures = _pictures()
    paths = []
    for k, picture in enumerate(pictures):
        path = tmp_path / f"{k}.png"
        cv2.imwrite(str(path), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
        paths.append(path)
    arrays = masker.predict(pictures, mask_size="model")
    tensors = [torch.from_numpy(p).permute(2, 0, 1).float() / 255 for p in pictures]
    for other in (
        masker.predict(paths, mask_size="model"),
        masker.predict(tensors, mask_size="model"),
    ):
        assert other.boxes == arrays.boxes and other.labels == arrays.labels
        for a, b in zip(arrays.masks, other.masks, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6)
    batched = masker.predict([str(p) for p in paths], batch_size=1, mask_size="model")
    assert batched.boxes == arrays.boxes and batched.indices == arrays.indices


def test_the_three_runtimes_agree(files):
    pictures = _pictures()
    results = [
        casm_deploy.Masker.load(files[kind], device="cpu").predict(pictures, mask_size="model")
        for kind in ("onnx", "torchscript", "eager")
    ]
    for other in results[1:]:
        assert other.indices == results[0].indices
        for a, b in zip(results[0].masks, other.masks, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-4)


def test_describe_scales_a_known_mask_and_reads_uint8_levels(masker):
    masks = np.zeros((2, SIZE, SIZE), np.float32)
    masks[:, 16:32, 8:40] = 1  # model-frame box [8, 16, 40, 32]
    logits = np.array([[0.0, 2.0, 0.0], [3.0, 0.0, 0.0]], np.float32)
    rows = masker.describe(masks, logits, [(128, 32), (63, 65)])
    assert rows[0]["box"] == [16, 8, 80, 16]  # x * 2, y / 2
    assert rows[1]["box"] == [7, 16, 40, 33]  # edges outwards: floor, ceil
    assert [r["class_index"] for r in rows] == [1, 0]
    assert rows[0]["label"] == masker.info.wnids[1] and rows[0]["name"] == masker.info.names[1]
    assert rows[0]["score"] == round(float(np.exp(2) / (np.exp(2) + 2)), 6)
    assert rows[0]["mask_mean"] == 0.125 and (rows[0]["width"], rows[0]["height"]) == (128, 32)
    levels = (masks * 255).astype(np.uint8)
    assert masker.describe(levels, logits, [(128, 32), (63, 65)]) == rows
    empty = masker.describe(np.zeros((1, SIZE, SIZE), np.float32), logits[:1], [(10, 10)])
    assert empty[0]["box"] is None


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_a_bad_input_is_named_in_one_line(masker, tmp_path):
    missing = tmp_path / "missing.jpg"
    with pytest.raises(ValueError) as error:
        masker.predict([_pictures()[0], missing])
    assert _one_line(error).startswith(f"{missing}: ")
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    with pytest.raises(ValueError) as error:
        masker.predict(text)
    assert _one_line(error).startswith(f"{text}: ")
    with pytest.raises(ValueError) as error:
        masker.predict([np.zeros((8, 8, 4), np.uint8)])
    assert _one_line(error) == "expected an (H, W, 3) image, got shape (8, 8, 4)"
    with pytest.raises(ValueError, match="mask_size 'full': choose original or model"):
        masker.predict(_pictures(), mask_size="full")


def test_load_refuses_what_is_not_a_model_in_one_line(tmp_path):
    from casm_deploy.errors import UserError

    bogus = tmp_path / "model.onnx"
    bogus.write_bytes(b"\x00" * 64)
    with pytest.raises(UserError) as error:
        casm_deploy.Masker.load(bogus, device="cpu")
    assert _one_line(error).startswith(str(bogus))
    with pytest.raises(UserError, match="no such model file"):
        casm_deploy.Masker.load(Path(tmp_path / "none.ts"), device="cpu")
