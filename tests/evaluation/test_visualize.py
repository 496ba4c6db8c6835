"""visualize.run: grid size, an HTML gallery whose images exist, the JSON record, user errors."""

from __future__ import annotations

import dataclasses
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from casm_deploy.config import VisualizeConfig
from casm_deploy.errors import UserError
from casm_deploy.evaluation import figures, visualize


class _ImageSources(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def test_run_writes_grid_gallery_and_json(tiny_data, tmp_path, make_checkpoint):
    first = make_checkpoint(tmp_path / "run-a" / "checkpoint.pt", tiny_data)
    second = make_checkpoint(tmp_path / "run-b" / "checkpoint.pt", tiny_data, seed=1)
    import cv2

    one = visualize.run(
        VisualizeConfig(
            models=(first,), data=str(tiny_data), out=str(tmp_path / "one"), num_images=4
        )
    )
    two = visualize.run(
        VisualizeConfig(
            models=(first, second), data=str(tiny_data), out=str(tmp_path / "two"), num_images=4
        )
    )
    grid_one, grid_two = cv2.imread(one["grid"]), cv2.imread(two["grid"])
    cell = figures.cell_size(32)
    assert cell >= 128
    assert grid_one.shape[:2] == figures.grid_shape(4, 1, 32)
    assert grid_two.shape[:2] == figures.grid_shape(4, 2, 32)
    assert grid_one.shape[1] == figures.LABEL_WIDTH + 4 * (cell + figures.PAD)
    assert grid_two.shape[0] - grid_one.shape[0] == 4 * (cell + figures.PAD)

    parser = _ImageSources()
    parser.feed(Path(two["html"]).read_text())
    assert len(parser.sources) == 4 * 2 * 2  # per image and model: boxes + heatmap
    for src in parser.sources:
        assert not Path(src).is_absolute()
        assert (Path(two["html"]).parent / src).is_file()

    record = json.loads(Path(two["json"]).read_text())
    assert record["config"]["models"] == [first, second]
    assert record["config"]["annotations"] == str(tiny_data / "annotations")
    images = record["images"]
    assert len(images) == 4
    assert len({image["class"] for image in images}) == 3  # spread over the classes
    for image in images:
        assert Path(image["path"]).is_file() and image["boxes"]
        assert [m["model"] for m in image["models"]] == ["run-a", "run-b"]
        for result in image["models"]:
            assert 0.0 <= result["iou"] <= 1.0
            assert result["hit"] == (result["iou"] > 0.5)
            assert result["box"] is None or len(result["box"]) == 4

    again = visualize.run(
        VisualizeConfig(
            models=(first,), data=str(tiny_data), out=str(tmp_path / "again"), num_images=4
        )
    )
    paths = [i["path"] for i in json.loads(Path(again["json"]).read_text())["images"]]
    assert paths == [i["path"] for i in images]  # the same seed picks the same images


def test_models_of_different_sizes_are_refused(tiny_data, tmp_path, make_checkpoint):
    a = make_checkpoint(tmp_path / "a" / "checkpoint.pt", tiny_data, image_size=32)
    b = make_checkpoint(tmp_path / "b" / "checkpoint.pt", tiny_data, image_size=64)
    cfg = VisualizeConfig(models=(a, b), data=str(tiny_data), out=str(tmp_path / "out"))
    with pytest.raises(UserError, match="image size"):
        visualize.run(cfg)


def test_missing_checkpoint_is_named(tiny_data, tmp_path):
    missing = str(tmp_path / "nowhere" / "checkpoint.pt")
    cfg = VisualizeConfig(models=(missing,), data=str(tiny_data), out=str(tmp_path / "out"))
    with pytest.raises(UserError, match="nowhere"):
        visualize.run(cfg)


def test_pick_samples_is_seeded_and_spread():
    samples = [(Path(f"{label}-{i}.png"), label) for label in range(3) for i in range(5)]
    picked = visualize.pick_samples(samples, 6, seed=3)
    assert picked == visualize.pick_samples(samples, 6, seed=3)
    assert sorted(label for _, label in picked) == [0, 0, 1, 1, 2, 2]
    assert len(visualize.pick_samples(samples, 100, seed=0)) == 15


def _photos(root: Path) -> Path:
    """5 images in a folder and a subfolder, extensions in any case, a text file and a file
    that is no image: not an ImageNet layout."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    for i in range(5):
        folder = root / "trip" if i % 2 else root
        folder.mkdir(parents=True, exist_ok=True)
        image = rng.integers(0, 255, (48 + 8 * i, 64, 3), dtype=np.uint8)
        cv2.imwrite(str(folder / f"{i}.{'JPG' if i < 3 else 'png'}"), image)
    (root / "notes.txt").write_text("not an image")
    (root / "broken.png").write_bytes(b"not a png either")
    return root


def test_a_plain_folder_of_images_gets_a_gallery_without_ground_truth(
    tiny_data, tmp_path, make_checkpoint, capsys
):
    import cv2

    model = make_checkpoint(tmp_path / "run-a" / "checkpoint.pt", tiny_data)
    photos = _photos(tmp_path / "photos")
    cfg = VisualizeConfig(models=(model,), data=str(photos), out=str(tmp_path / "a"), num_images=4)
    written = visualize.run(cfg)
    printed = capsys.readouterr().out
    assert "not an ImageNet layout" in printed and "no ground truth, no IoU" in printed

    assert cv2.imread(written["grid"]).shape[:2] == figures.grid_shape(4, 1, 32)
    page = Path(written["html"]).read_text()
    assert "IoU" not in page.replace("no IoU", "") and "ground truth</span>" not in page
    parser = _ImageSources()
    parser.feed(page)
    assert len(parser.sources) == 4 * 2
    assert all((Path(written["html"]).parent / src).is_file() for src in parser.sources)

    images = json.loads(Path(written["json"]).read_text())["images"]
    paths = [image["path"] for image in images]
    assert len(paths) == 4 and paths == sorted(paths)
    assert all(Path(p).is_relative_to(photos) and Path(p).suffix != ".txt" for p in paths)
    assert str(photos / "broken.png") not in paths
    for image in images:
        assert image["class"] is None and image["boxes"] == []
        (result,) = image["models"]
        assert "iou" not in result and 0.0 <= result["score"] <= 1.0
        assert result["predicted_name"] in page

    again = visualize.run(dataclasses.replace(cfg, out=str(tmp_path / "b")))
    assert [i["path"] for i in json.loads(Path(again["json"]).read_text())["images"]] == paths
    every = visualize.run(dataclasses.replace(cfg, out=str(tmp_path / "c"), num_images=50))
    assert len(json.loads(Path(every["json"]).read_text())["images"]) == 5  # broken.png passed


def test_a_plain_folder_without_images_is_a_user_error(tiny_data, tmp_path, make_checkpoint):
    model = make_checkpoint(tmp_path / "run-a" / "checkpoint.pt", tiny_data)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    cfg = VisualizeConfig(models=(model,), data=str(empty), out=str(tmp_path / "out"))
    with pytest.raises(UserError, match="no image files"):
        visualize.run(cfg)


# --- Grad-CAM beside the mappings, and masks.png ----------------------------------------------

GRADCAM = "Grad-CAM (stage 2)"  # stage 2 is 4x4 at 32 px: a map with room for a box


def _images(pixels):
    import torch

    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255)


def test_gradcam_is_one_more_method_in_every_output(tiny_data, tmp_path, make_checkpoint):
    import cv2

    from casm_deploy.checkpoint import load_masker
    from casm_deploy.evaluation.gradcam import gradcam
    from casm_deploy.evaluation.metrics import masks_to_boxes

    first = make_checkpoint(tmp_path / "run-a" / "checkpoint.pt", tiny_data)
    second = make_checkpoint(tmp_path / "run-b" / "checkpoint.pt", tiny_data, seed=1)
    cfg = VisualizeConfig(
        models=(first, second), data=str(tiny_data), out=str(tmp_path / "v"), num_images=4,
        gradcam_stage=2,
    )  # fmt: skip
    written = visualize.run(cfg)
    assert list(written) == ["grid", "masks", "html", "json"]

    cell, step = figures.cell_size(32), figures.cell_size(32) + figures.PAD
    grid = cv2.imread(written["grid"])
    assert grid.shape[:2] == figures.grid_shape(4, 3, 32)  # two models and Grad-CAM's block
    assert grid.shape[0] - figures.grid_shape(4, 2, 32)[0] == len(figures.ROW_NAMES) * step
    masks = cv2.imread(written["masks"])
    assert masks.shape[:2] == figures.masks_shape(4, 3, 32)
    assert masks.shape[:2] == (
        figures.HEADER_HEIGHT + (1 + 2 + 1) * step,
        figures.LABEL_WIDTH + 4 * step,
    )
    assert cell >= 128

    page = Path(written["html"]).read_text()
    assert 'href="masks.png"' in page and 'href="grid.png"' in page and GRADCAM in page
    parser = _ImageSources()
    parser.feed(page)
    assert len(parser.sources) == 4 * 3 * 2  # per image and method: boxes + heatmap
    assert all((Path(written["html"]).parent / src).is_file() for src in parser.sources)

    record = json.loads(Path(written["json"]).read_text())
    assert record["files"]["masks"] == "masks.png" and record["files"]["grid"] == "grid.png"
    assert record["config"]["gradcam_stage"] == 2
    images = record["images"]
    explained = [image["models"][-1] for image in images]
    for image, result in zip(images, explained, strict=True):
        assert [m["model"] for m in image["models"]] == ["run-a", "run-b", GRADCAM]
        assert result["checkpoint"] == first  # the classifier it explains
        assert result["box"] is not None and len(result["box"]) == 4
        assert 0.0 <= result["iou"] <= 1.0 and result["hit"] == (result["iou"] > 0.5)
        assert 0.0 <= result["mask_mean"] <= 1.0

    # the same boxes and classes as Grad-CAM itself gives on the same images
    masker, spec = load_masker(first)
    pixels, _ = visualize.dataset_samples(cfg, tiny_data / "annotations", 32)
    cams, logits = gradcam(masker, _images(pixels), stage=2)
    assert [r["box"] for r in explained] == [list(b) for b in masks_to_boxes(cams)]
    assert [r["predicted_class"] for r in explained] == [
        spec.wnids[k] for k in logits.argmax(1).tolist()
    ]


def test_gradcam_on_a_plain_folder_gives_predicted_boxes(tiny_data, tmp_path, make_checkpoint):
    import cv2

    model = make_checkpoint(tmp_path / "run-a" / "checkpoint.pt", tiny_data)
    photos = _photos(tmp_path / "photos")
    cfg = VisualizeConfig(
        models=(model,), data=str(photos), out=str(tmp_path / "v"), num_images=4, gradcam_stage=3
    )
    written = visualize.run(cfg)
    assert cv2.imread(written["grid"]).shape[:2] == figures.grid_shape(4, 2, 32)
    assert cv2.imread(written["masks"]).shape[:2] == figures.masks_shape(4, 2, 32)
    for image in json.loads(Path(written["json"]).read_text())["images"]:
        assert image["boxes"] == []
        model_result, result = image["models"]
        assert result["model"] == "Grad-CAM (stage 3)" and "iou" not in result
        assert 0.0 <= result["score"] <= 1.0
        assert result["predicted_class"] == model_result["predicted_class"]  # one classifier


def test_gradcam_after_an_exported_model_is_a_one_line_error(tiny_data, tmp_path, make_exports):
    from typer.testing import CliRunner

    from casm_deploy.cli import app

    onnx = make_exports(tmp_path / "export", tiny_data, formats=("onnx",))["onnx"]
    out = tmp_path / "v"
    args = ["visualize", str(onnx), str(tiny_data), "--gradcam-stage", "3", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --gradcam-stage"), result.output
    assert str(onnx) in lines[0] and "checkpoint first" in lines[0]
    assert not out.exists()


def test_gradcam_stage_is_checked_by_the_option(tmp_path):
    from typer.testing import CliRunner

    from casm_deploy.cli import app

    with pytest.raises(ValueError, match="--gradcam-stage must be one of 0, 1, 2, 3, 4, not 5"):
        VisualizeConfig(gradcam_stage=5)
    args = ["visualize", str(tmp_path / "m.pt"), "--gradcam-stage", "5"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "v")])
    assert result.exit_code == 2
    assert "--gradcam-stage must be one of 0, 1, 2, 3, 4, not 5" in result.output
    assert VisualizeConfig().gradcam_stage == 0  # none by default


def test_masks_figure_dims_low_mask_and_draws_the_boxes():
    import numpy as np

    size, n = 32, 2
    images = np.full((n, size, size, 3), 200, np.uint8)
    mask = np.zeros((n, size, size), np.float32)
    mask[:, :, size // 2 :] = 1.0  # the right half is salient
    pred, gt = [2, 2, 10, 10], [20, 20, 30, 30]
    figure = figures.draw_masks(images, [mask], [[pred, None]], [[gt], []], ["casm"], ["a", "b"])
    assert figure.shape[:2] == figures.masks_shape(n, 1, size)
    cell, scale = figures.cell_size(size), figures.cell_size(size) // size
    step = cell + figures.PAD

    def cell_of(row, col):
        top, left = figures.HEADER_HEIGHT + row * step, figures.LABEL_WIDTH + col * step
        return figure[top : top + cell, left : left + cell]

    original, method = cell_of(0, 1), cell_of(1, 1)
    assert (original == 200).all()  # image b: no boxes, shown as it is
    assert (method[:, : cell // 2] == 50).all()  # 200 * DIM_FLOOR where the mask is 0
    assert (method[:, cell // 2 :] == 200).all()  # whole where the mask is 1
    boxed = cell_of(1, 0)  # image a: its true box in green, the predicted one in red
    assert tuple(boxed[pred[1] * scale, pred[0] * scale + 4]) == figures.PRED_COLOR
    assert tuple(boxed[gt[3] * scale - 1, gt[0] * scale + 4]) == figures.GT_COLOR  # exclusive
    assert tuple(cell_of(0, 0)[gt[1] * scale, gt[0] * scale + 4]) == figures.GT_COLOR


def test_masks_figure_of_12_images_and_4_rows_is_small(tmp_path):
    """README-sized: 12 images of 64 px, the original and 3 methods, under 1 MB even for
    incompressible pixels (written with PNG compression 9, as visualize writes it)."""
    import numpy as np

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 64, 64, 3), dtype=np.uint8)
    masks = [rng.random((12, 64, 64)).astype(np.float32) for _ in range(3)]
    boxes = [[[8, 8, 40, 40]] * 12 for _ in range(3)]
    figure = figures.draw_masks(
        images, masks, boxes, [[[4, 4, 50, 60]]] * 12, ["a", "b", "c"], ["x"] * 12
    )
    assert figure.shape[:2] == figures.masks_shape(12, 3, 64) == (542, 1720)
    path = tmp_path / "masks.png"
    figures.write_png(path, figure, compression=9)
    assert path.stat().st_size < 1_000_000
